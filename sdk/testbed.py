"""The simulated edge testbed: N ordinary agent processes on this machine.

``Testbed(TestbedConfig(profile=load_profile("mixed", 4)))`` starts an MQTT broker (the
embedded one in this process, or the given ``broker``), writes a cluster key (or reads a
given key file), spawns one ``edgeswarm agent`` process per device of the profile on
loopback and waits until a coordinator sees every one online::

    from edgeswarm.testbed import Testbed, TestbedConfig
    from edgeswarm.testbed_profile import load_profile

    with Testbed(TestbedConfig(profile=load_profile("mixed", 4))) as tb:
        cluster = es.Cluster.connect(broker=tb.broker_uri, cluster=tb.cluster, key=tb.key)
        tb.kill("pi-1")                                 # kill -9: seen as lost
        tb.join("pi-2", speed=0.25)                     # a new agent, waited for

Emulation is two knobs of the real agent, nothing else: ``--speed`` (the executor
stretches compute by 1/speed; the profile's FLOP/s are scaled) and ``--link``/``--link-to``
(published in the agent's DeviceState; the coordinator puts them into the deploy manifest's
``links`` and the data plane delays every send by latency + size / bandwidth). Each agent
runs with ``OMP_NUM_THREADS=1`` and its own artifact cache under a temporary directory
that ``stop()`` removes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from edgeswarm.device_agent.protocol import DeviceState, Model
from edgeswarm.device_agent.topics import NAME_PATTERN
from edgeswarm.placement.errors import Error, InvalidInput
from edgeswarm.testbed_agents import LOOPBACK, AgentProcesses
from edgeswarm.testbed_churn import ChurnEvent, ChurnRun, check_churn, parse_churn, read_churn
from edgeswarm.testbed_profile import TestbedProfile, check_links

if TYPE_CHECKING:
    from edgeswarm.device_agent.broker import EmbeddedBroker
    from edgeswarm.device_agent.coordinator import Coordinator
    from edgeswarm.device_agent.membership import Member

log = logging.getLogger("edgeswarm.testbed")

__all__ = ["AgentStatus", "Testbed", "TestbedConfig"]


class TestbedConfig(Model):
    """What ``edgeswarm testbed`` is told (frozen, strict)."""

    __test__ = False  # not a pytest test class

    profile: TestbedProfile
    cluster: str = Field(default="testbed", pattern=rf"^{NAME_PATTERN}$")
    broker: str | None = None          # mqtt://HOST:PORT; None: the embedded broker
    broker_port: int = Field(default=0, ge=0, le=65535)   # the embedded broker's (0: free)
    key_file: Path | None = None       # None: a new key in the temporary directory
    host: str = LOOPBACK               # the agents' data host and zeroconf interface
    heartbeat_s: float = Field(default=0.5, gt=0)
    advertise: bool = True             # agents advertise through zeroconf (on ``host``)
    threads_per_agent: int = Field(default=1, ge=1)   # OMP_NUM_THREADS of each agent
    start_timeout_s: float = Field(default=60.0, gt=0)   # spawn -> all online
    stop_timeout_s: float = Field(default=10.0, gt=0)    # SIGTERM -> SIGKILL


@dataclass(frozen=True)
class AgentStatus:
    """One agent as the testbed sees it: its process and the coordinator's membership.

    ``status`` is the membership's ``online``/``lost``/``left`` once this process's state
    arrived, else ``starting`` (process running) or ``exited``.
    """

    name: str
    pid: int
    alive: bool                        # the process is running
    status: str
    speed: float
    links: dict[str, str]              # outgoing links by peer ("*": every other)
    deployments: tuple[str, ...] = ()
    heartbeat_age_s: float | None = None   # since the coordinator last heard it
    exit_code: int | None = None

    @property
    def online(self) -> bool:
        return self.status == "online"


@dataclass
class _Agent:
    name: str
    speed: float
    links: dict[str, str]
    pid: int
    before: DeviceState | None = None  # the membership's state of this name at spawn time


class Testbed:
    """N agent processes, a broker and a watching coordinator; ``start()`` then ``stop()``
    (or a ``with`` block). Safe to use from several threads (the churn thread among them)."""

    __test__ = False

    def __init__(self, config: TestbedConfig, *, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._agents: dict[str, _Agent] = {}
        self._procs: AgentProcesses | None = None
        self._broker: EmbeddedBroker | None = None
        self._watch: Coordinator | None = None
        self._coordinators: list[Coordinator] = []
        self._churn: list[ChurnRun] = []
        self._workdir: Path | None = None
        self._key: bytes | None = None
        self._key_file: Path | None = None
        self._broker_uri = config.broker or ""
        self._started = self._stopped = False
        self.up_s: float | None = None   # spawn -> every agent online, measured by start()

    # -- what callers need to connect ------------------------------------------------
    @property
    def broker_uri(self) -> str:
        return self._broker_uri

    @property
    def cluster(self) -> str:
        return self.config.cluster

    @property
    def key_file(self) -> Path:
        if self._key_file is None:
            raise Error("the testbed is not started: call start() first")
        return self._key_file

    @property
    def key(self) -> bytes:
        if self._key is None:
            raise Error("the testbed is not started: call start() first")
        return self._key

    @property
    def names(self) -> list[str]:
        """The agents whose process is running, in start order."""
        with self._lock:
            procs = self._procs
            return [] if procs is None else [n for n in self._agents if procs.alive(n)]

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Broker, key, coordinator, every agent; returns once all are online.

        Raises Error naming the agents that did not come online in ``start_timeout_s``,
        with the end of their logs; everything started so far is stopped again.
        """
        if self._started:
            raise InvalidInput("Testbed.start() was already called; make a new Testbed")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from edgeswarm.device_agent import keys
        from edgeswarm.device_agent.broker import EmbeddedBroker
        from edgeswarm.device_agent.coordinator import Coordinator

        cfg = self.config
        self._workdir = Path(tempfile.mkdtemp(prefix="edgeswarm-testbed-"))
        if cfg.key_file is None:
            self._key = keys.generate()
            self._key_file = keys.write(self._workdir / "cluster.key", self._key)
        elif cfg.key_file.exists():
            self._key, self._key_file = keys.read(cfg.key_file), cfg.key_file
        else:  # a new key where the caller wants it (kept after stop, for other terminals)
            cfg.key_file.parent.mkdir(parents=True, exist_ok=True)
            self._key = keys.generate()
            self._key_file = keys.write(cfg.key_file, self._key)
        if cfg.broker is None:
            self._broker = EmbeddedBroker(host=cfg.host, port=cfg.broker_port)
            self._broker.start()
            self._broker_uri = self._broker.uri
        self._watch = Coordinator(self._broker_uri, cfg.cluster, self._key,
                                  data_host=cfg.host, clock=self._clock)
        self._watch.on_change(self._changed)
        self._watch.start()
        self._procs = AgentProcesses(self._workdir, self._key_file, host=cfg.host,
                                     env={"OMP_NUM_THREADS": str(cfg.threads_per_agent)})
        t0 = time.monotonic()
        profile = cfg.profile
        for device in profile.devices:
            self._spawn(device.id, device.speed, profile.links_of(device))
        self._wait_online([d.id for d in profile.devices], cfg.start_timeout_s)
        self.up_s = time.monotonic() - t0
        log.info("testbed %s: %d agents online in %.2f s via %s", cfg.cluster,
                 len(profile.devices), self.up_s, self._broker_uri)

    def stop(self) -> None:
        """Stop churn and callers' coordinators, SIGTERM every agent (SIGKILL after
        ``stop_timeout_s``), stop the coordinator and the broker, remove the temporary
        directory. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        for run in self._churn:
            run.stop()
        for coordinator in self._coordinators:
            _quietly(coordinator.stop, "a coordinator")
        procs = self._procs
        if procs is not None:
            _quietly(lambda: procs.stop_all(self.config.stop_timeout_s), "the agents")
        if self._watch is not None:
            _quietly(self._watch.stop, "the testbed's coordinator")
        if self._broker is not None:
            _quietly(self._broker.stop, "the embedded broker")
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- churn -----------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL the agent (``kill -9``): the broker publishes its last will, and the
        coordinator reports it lost."""
        procs = self._running(name)
        procs.kill(name)
        log.info("testbed: killed %s", name)

    def leave(self, name: str) -> None:
        """SIGTERM the agent: it publishes "offline" (left) and exits; does not wait."""
        self._running(name).terminate(name)
        log.info("testbed: %s leaves", name)

    def join(self, name: str, speed: float = 1.0, links: dict[str, str] | None = None,
             wait: bool = True, timeout_s: float | None = None) -> None:
        """Start a new agent ``name`` (or restart one that exited). ``links``: peer id or
        "*" -> link spec; "*" defaults to the profile's ``default_link``. With ``wait``,
        returns once it is online (Error after ``timeout_s``, default ``start_timeout_s``)."""
        if not speed > 0:
            raise InvalidInput(f"join {name}: speed must be > 0, got {speed}")
        table = {"*": self.config.profile.default_link, **check_links(dict(links or {}))}
        self._spawn(name, speed, table)
        if wait:
            self._wait_online([name], self.config.start_timeout_s if timeout_s is None
                              else timeout_s)

    def run_churn(self, script: str | Path | Sequence[ChurnEvent], *,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], object] | None = None,
                  on_event: Callable[[float, ChurnEvent], None] | None = None) -> ChurnRun:
        """Play a churn script (its text, a file, or parsed events) on a thread; returns the
        running :class:`ChurnRun`. Its names are checked against the running agents first.
        ``stop()`` stops it."""
        if isinstance(script, Path):
            events = read_churn(script)
        elif isinstance(script, str):
            events = parse_churn(script)
        else:
            events = list(script)
        check_churn(events, self.names)
        run = ChurnRun(self, events, clock=clock, sleep=sleep, on_event=on_event)
        with self._lock:
            if self._stopped:
                raise Error("the testbed is stopped")
            self._churn.append(run)
        return run.start()

    # -- what is going on ------------------------------------------------------------
    def coordinator(self, heartbeat_timeout_s: float = 1.5) -> Coordinator:
        """A started Coordinator of this testbed's cluster, for the caller; stopped with the
        testbed (or earlier by the caller's ``stop()``)."""
        from edgeswarm.device_agent.coordinator import Coordinator

        coordinator = Coordinator(self.broker_uri, self.cluster, self.key,
                                  data_host=self.config.host,
                                  heartbeat_timeout_s=heartbeat_timeout_s)
        coordinator.start()
        with self._lock:
            self._coordinators.append(coordinator)
        return coordinator

    def status(self) -> list[AgentStatus]:
        """Every agent started (the latest process of each name), in start order."""
        with self._lock:
            agents = list(self._agents.values())
            procs = self._procs
        members = self._watch.membership.members if self._watch is not None else {}
        now = self._clock()
        out = []
        for agent in agents:
            proc = procs.procs[agent.name] if procs is not None else None
            code = None if proc is None else proc.poll()
            member = members.get(agent.name)
            current = member is not None and member.state is not agent.before
            if current:
                assert member is not None
                status: str = member.status
                deployments = tuple(member.state.deployments)
                age: float | None = max(0.0, now - member.last_seen)
            else:
                status, deployments, age = ("starting" if code is None else "exited"), (), None
            out.append(AgentStatus(agent.name, agent.pid, code is None, status, agent.speed,
                                   dict(agent.links), deployments, age, code))
        return out

    def log_tail(self, name: str, chars: int = 1500) -> str:
        """The end of the agent's log (its stderr)."""
        return "" if self._procs is None else self._procs.log_tail(name, chars)

    # -- internals -------------------------------------------------------------------
    def _spawn(self, name: str, speed: float, links: dict[str, str]) -> None:
        cfg = self.config
        with self._lock:
            if self._procs is None or self._watch is None or self._stopped:
                raise Error("the testbed is not running: start() it first")
            extra = ["--speed", repr(float(speed)), "--heartbeat", repr(cfg.heartbeat_s)]
            for peer, spec in links.items():
                extra += ["--link", spec] if peer == "*" else ["--link-to", f"{peer}={spec}"]
            if not cfg.advertise:
                extra.append("--no-advertise")
            member: Member | None = self._watch.membership.members.get(name)
            proc = self._procs.spawn(name, cfg.cluster, self._broker_uri, *extra)
            self._agents.pop(name, None)   # a restarted name moves to the end
            self._agents[name] = _Agent(name, speed, links, proc.pid,
                                        None if member is None else member.state)

    def _running(self, name: str) -> AgentProcesses:
        with self._lock:
            procs = self._procs
            if procs is None or name not in self._agents:
                raise InvalidInput(f"no agent {name!r} in this testbed "
                                   f"(running: {', '.join(self.names) or 'none'})")
            if not procs.alive(name):
                raise InvalidInput(f"agent {name!r} is not running any more")
            return procs

    def _changed(self, *_: Any) -> None:
        with self._cv:
            self._cv.notify_all()

    def _wait_online(self, names: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pending = list(names)
        while True:
            states = {s.name: s for s in self.status()}
            pending = [n for n in pending if not states[n].online]
            exited = [n for n in pending if not states[n].alive]
            if not pending:
                return
            left = deadline - time.monotonic()
            if exited or left <= 0:
                break
            with self._cv:
                self._cv.wait(min(left, 0.1))
        why = (f"exited: {', '.join(f'{n} (status {states[n].exit_code})' for n in exited)}"
               if exited else f"not online within {timeout_s:g} s: {', '.join(pending)}")
        tails = "\n".join(f"--- last lines of {n}'s log ---\n{self.log_tail(n, 1200).rstrip()}"
                          for n in (exited or pending)[:3])
        raise Error(f"testbed {self.cluster}: agents {why} (broker {self._broker_uri})\n{tails}")


def _quietly(stop: Callable[[], object], what: str) -> None:
    try:
        stop()
    except Exception:
        log.exception("stopping %s failed", what)
