"""MQTT brokers the agent can start itself: an embedded amqtt broker, or a Mosquitto process.

The control plane needs one broker per cluster. ``EmbeddedBroker`` is the zero-setup
default (testbed, quickstart, ``edgeswarm agent --embedded-broker``): amqtt, a pure-Python
broker, run on its own asyncio loop in a daemon thread. It speaks MQTT 3.1.1 only, so
clients must connect with ``paho.mqtt.client.MQTTv311``. ``Mosquitto`` starts the real
Mosquitto binary with a generated config (tests, and anyone who wants a proper broker on
one machine): anonymous or username/password, optionally TLS, and ``set_tcp_nodelay true``
— without it every round trip waits 40-90 ms for Nagle's algorithm.

The embedded broker accepts connections on a server socket it owns (amqtt's "external"
listener), so it can bind port 0 without a race and its sockets get asyncio's default
``TCP_NODELAY``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import getpass
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edgeswarm.placement.errors import Error, InvalidInput, RuntimeNotAvailable

log = logging.getLogger("edgeswarm.agent.broker")

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
# amqtt logs every connection and packet at INFO; the embedded broker keeps them at WARNING.
_NOISY_LOGGERS = ("amqtt", "transitions")


class BrokerError(Error):
    """A broker could not be started (port taken, bad config, binary missing a feature)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free right now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(host: str, port: int, deadline: float,
                   proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll until ``host:port`` accepts a connection, ``proc`` exits, or the deadline."""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


class EmbeddedBroker:
    """An amqtt broker on its own event loop in a daemon thread (MQTT 3.1.1, anonymous)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 start_timeout_s: float = 10.0, stop_timeout_s: float = 10.0) -> None:
        self.host = host
        self._requested_port = port
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the embedded broker is not running: call start() first")
        return self._port

    @property
    def uri(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        """Start the broker thread; returns once the broker accepts connections."""
        if self._thread is not None:
            raise BrokerError("the embedded broker was already started; make a new one")
        for name in _NOISY_LOGGERS:
            logger = logging.getLogger(name)
            if logger.level == logging.NOTSET:  # an explicit choice (say DEBUG) is kept
                logger.setLevel(logging.WARNING)
        self._thread = threading.Thread(target=self._run, name="edgeswarm-embedded-broker",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            self.stop()
            raise BrokerError(f"the embedded broker did not start within "
                              f"{self._start_timeout_s:.1f} s on {self.host}")
        if self._failure is not None:
            self._thread.join(self._stop_timeout_s)
            raise BrokerError(f"the embedded broker could not listen on "
                              f"{self.host}:{self._requested_port}: {self._failure}; "
                              f"pick another port") from self._failure
        log.info("embedded MQTT broker listening on %s", self.uri)

    def stop(self) -> None:
        """Disconnect every client, close the listener and join the thread."""
        if self._thread is None:
            return
        self._stopping.set()  # seen by _serve if it has not made its stop event yet
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if loop is not None and stop_event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop_event.set)
        thread.join(self._stop_timeout_s)
        if thread.is_alive():
            log.warning("the embedded broker thread did not stop within %.1f s",
                        self._stop_timeout_s)
        self._port = None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._failure = exc
            self._ready.set()
        finally:
            _cancel_remaining(loop)
            loop.close()

    async def _serve(self) -> None:
        from amqtt.broker import Broker  # heavy import, only when a broker is wanted

        self._stop_event = asyncio.Event()
        config = {
            "listeners": {"default": {"type": "external"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin":
                        {"allow_anonymous": True}},
        }
        broker = Broker(config)
        await broker.start()
        try:
            server = await asyncio.start_server(
                functools.partial(broker.stream_connected, listener_name="default"),
                self.host, self._requested_port)
        except BaseException:
            await broker.shutdown()
            raise
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            if not self._stopping.is_set():
                await self._stop_event.wait()
        finally:
            server.close()
            await broker.shutdown()
            await server.wait_closed()


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending on ``loop`` (client handlers) and let them finish."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS listener: the CA that signed the server certificate, and the pair."""

    cafile: Path
    certfile: Path
    keyfile: Path


def mosquitto_path() -> Path:
    """The Mosquitto broker binary, or RuntimeNotAvailable saying how to install it."""
    found = shutil.which("mosquitto")
    candidates = ([found] if found else []) + list(MOSQUITTO_CANDIDATES)
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    raise RuntimeNotAvailable("the Mosquitto broker is not installed: run "
                              "`sudo apt-get install mosquitto` (or use --embedded-broker)")


def _mosquitto_passwd_path() -> Path:
    found = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not os.access(found, os.X_OK):
        raise RuntimeNotAvailable("mosquitto_passwd is not installed: run "
                                  "`sudo apt-get install mosquitto`")
    return Path(found)


class Mosquitto:
    """A Mosquitto process on ``host:port`` with a generated config in a temporary directory.

    With ``users`` it requires a username and password (hashed with ``mosquitto_passwd``);
    with ``tls`` the listener speaks TLS and ``uri`` is ``mqtts://``. Port 0 picks a free port.
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1",
                 users: Mapping[str, str] | None = None, tls: TlsFiles | None = None,
                 start_timeout_s: float = 10.0, stop_timeout_s: float = 5.0,
                 attempts: int = 3) -> None:
        for name in users or {}:
            if not name or ":" in name or any(c.isspace() for c in name):
                raise InvalidInput(f"MQTT user name {name!r} must be non-empty with no ':' "
                                   f"or spaces")
        self.host = host
        self.users = dict(users or {})
        self.tls = tls
        self._requested_port = port
        self._port: int | None = None
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._attempts = max(1, attempts)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("Mosquitto is not running: call start() first")
        return self._port

    @property
    def uri(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    def start(self) -> None:
        """Write the config, start ``mosquitto -c`` and wait until its port accepts."""
        if self._proc is not None:
            raise BrokerError("Mosquitto was already started; make a new one")
        binary = mosquitto_path()
        self._dir = Path(tempfile.mkdtemp(prefix="edgeswarm-mosquitto-"))
        password_file = self._write_passwords(self._dir) if self.users else None
        # A port picked by free_port() can be taken before mosquitto binds it: try again.
        for attempt in range(self._attempts):
            port = self._requested_port or free_port(self.host)
            config = self._dir / "mosquitto.conf"
            config.write_text(self._config(port, password_file))
            logfile = self._dir / "mosquitto.log"
            with logfile.open("wb") as out:
                proc = subprocess.Popen([str(binary), "-c", str(config)],  # noqa: S603
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            self._proc = proc
            deadline = time.monotonic() + self._start_timeout_s
            if _wait_for_port(self.host, port, deadline, proc):
                self._port = port
                log.info("Mosquitto listening on %s (pid %d)", self.uri, proc.pid)
                return
            self._kill()
            text = logfile.read_text(errors="replace")
            if "in use" not in text or self._requested_port or attempt + 1 == self._attempts:
                self._cleanup_dir()
                raise BrokerError(f"Mosquitto did not start on {self.host}:{port} within "
                                  f"{self._start_timeout_s:.1f} s; its log says:\n"
                                  f"{text[-2000:]}")

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL) and delete the config directory."""
        self._kill()
        self._cleanup_dir()
        self._port = None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _config(self, port: int, password_file: Path | None) -> str:
        lines = [
            "per_listener_settings false",
            "persistence false",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            f"listener {port} {self.host}",
        ]
        if os.geteuid() == 0:  # root mosquitto drops to user "mosquitto", who cannot read our files
            lines.append(f"user {getpass.getuser()}")
        if password_file is not None:
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [f"cafile {self.tls.cafile}", f"certfile {self.tls.certfile}",
                      f"keyfile {self.tls.keyfile}", "require_certificate false"]
        return "\n".join(lines) + "\n"

    def _write_passwords(self, directory: Path) -> Path:
        """A password file hashed in place by ``mosquitto_passwd -U``.

        Hashing a file keeps the passwords off command lines (``ps`` would show ``-b``).
        """
        path = directory / "passwords"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.writelines(f"{name}:{password}\n" for name, password in self.users.items())
        result = subprocess.run([str(_mosquitto_passwd_path()), "-U", str(path)],  # noqa: S603
                                capture_output=True, text=True, timeout=30, check=False)
        if result.returncode != 0:
            raise BrokerError(f"mosquitto_passwd could not hash the password file: "
                              f"{result.stderr.strip() or result.stdout.strip()}")
        return path

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self._stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(self._stop_timeout_s)

    def _cleanup_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
