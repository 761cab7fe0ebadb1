"""Agent processes on this machine: ``edgeswarm agent`` started as an ordinary child process.

The testbed (:mod:`edgeswarm.testbed`) and ``edgeswarm bench agent`` both start real
agents this way (``edgeswarm agent``'s command, without the rest of the CLI), on loopback:
each gets ``--interface``/``--data-host`` set to the host, its own artifact cache and its
own log file (stdout and stderr) under a work directory, and is stopped with SIGTERM (a
clean stop: it publishes "offline") or SIGKILL (churn: the broker publishes its last
will). Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from edgeswarm.placement.errors import InvalidInput

LOOPBACK = "127.0.0.1"


def agent_command() -> list[str]:
    """How to start ``edgeswarm`` from this interpreter: the console script next to it, or
    ``python -c`` with the CLI's entry point."""
    script = Path(sys.executable).with_name("edgeswarm")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from edgeswarm.cli import main; main()"]


def agent_only_command() -> list[str]:
    """How :class:`AgentProcesses` starts an agent: ``edgeswarm agent``'s command and
    options without the rest of the CLI (:func:`edgeswarm.cli_agent.main`), so that N
    agents starting together do not each import every other command's modules."""
    return [sys.executable, "-c", "from edgeswarm.cli_agent import main; main()"]


class AgentProcesses:
    """Agent processes started with ``edgeswarm agent``, by name; stopped and reaped by
    :meth:`stop_all`. A name may be started again once its process has exited."""

    def __init__(self, workdir: Path, key_file: Path, host: str = LOOPBACK,
                 env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.key_file = key_file
        self.host = host
        self.env = dict(env or {})   # added to this process's environment
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, cluster: str, broker: str,
              *extra: str) -> subprocess.Popen[bytes]:
        """Start agent ``name`` (``extra``: more ``edgeswarm agent`` options)."""
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise InvalidInput(f"agent {name!r} is already running (pid {old.pid}); kill it "
                               f"or pick another name")
        argv = [*agent_only_command(), "--name", name, "--cluster", cluster,
                "--broker", broker, "--key-file", str(self.key_file),
                "--interface", self.host, "--data-host", self.host,
                "--artifacts-dir", str(self.workdir / "artifacts" / name), *extra]
        env = {**os.environ, **self.env} if self.env else None
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,  # noqa: S603
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, chars: int = 1500) -> str:
        """The end of the agent's log (its stderr), or "" if there is none."""
        try:
            return self.log_path(name).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def kill(self, name: str, timeout_s: float = 10.0) -> None:
        """SIGKILL the agent (no clean stop: the broker publishes its last will); reap it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout_s)

    def terminate(self, name: str) -> None:
        """SIGTERM the agent: it stops cleanly (publishes "offline"); does not wait."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.terminate()

    def stop_all(self, timeout_s: float = 15.0, names: Sequence[str] | None = None) -> None:
        """SIGTERM every agent (or ``names``), wait up to ``timeout_s`` in all, then SIGKILL
        the stragglers and reap them."""
        procs = [self.procs[n] for n in (self.procs if names is None else names)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
