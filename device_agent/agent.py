"""The device agent: the daemon every device runs (``edgeswarm agent``).

:class:`Agent` composes the other modules. ``start()`` measures the device profile, opens
the data probe (:mod:`.probe`) and the metrics endpoint, starts the embedded broker if
asked (or finds the cluster's broker through zeroconf when none is given), connects with
a last will (a retained "offline" state), publishes its retained "online" state, starts
heartbeats and telemetry and advertises itself through zeroconf. Then it serves commands:

- ``ping`` is answered with a ``pong`` at once (in the MQTT thread);
- ``deploy`` and ``teardown`` run one at a time on a worker thread, through
  :class:`~edgeswarm.device_agent.deployments.Deployments`, and are answered with
  ``deployed``/``torn_down`` or an ``error`` event. That thread first waits for the
  warm-up (:mod:`.warm_up`, at a lower CPU priority): the agent announces itself with the
  fp32 profile the planner needs, then measures its int8 throughput (published in its
  next state) and imports what a deploy needs (torch's gloo, ONNX Runtime).

Bad input is the normal case on a network: every message that fails to unseal, and every
authentic command that cannot be honoured (unknown deployment, wrong artifact hash), is
refused with a logged reason (a warning once per sender and reason, then debug), counted
in ``edgeswarm_rejected_messages_total{reason}``, answered with an ErrorEvent when the
command was authentic, and the agent keeps serving. ``stop()`` publishes "offline", leaves
every deployment and stops everything it started, in reverse order.

``data_host`` is the device's address on the data network: gloo listens there, and so do
the data probe (``data_port``), the embedded broker and the metrics endpoint.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

import edgeswarm
from edgeswarm.device_agent import protocol, topics
from edgeswarm.device_agent.control import ConnectError, ControlClient, TlsConfig
from edgeswarm.device_agent.deployments import Deployments, reason_of
from edgeswarm.device_agent.manifest import LinkShape
from edgeswarm.device_agent.metrics import AgentMetrics
from edgeswarm.device_agent.probe import DataProbe
from edgeswarm.device_agent.protocol import (
    Deploy,
    DeviceState,
    ErrorEvent,
    Model,
    Ping,
    Rejected,
    Teardown,
)
from edgeswarm.device_agent.warm_up import WarmUp
from edgeswarm.placement.errors import Error, InvalidInput

log = logging.getLogger("edgeswarm.agent")

#: Tries at the first connection to the broker (a busy broker may drop one).
CONNECT_ATTEMPTS = 3
#: How much nicer the warm-up runs than the agent (:mod:`.warm_up`): at +10 a busy core
#: gives it about a tenth of its time, and an idle one all of it.
WARM_UP_NICE = 10

NAME = rf"^{topics.NAME_PATTERN}$"
# Authentic commands refused for these reasons are answered with an ErrorEvent ("replayed"
# is not: a QoS 1 duplicate is a replay too, and the original was answered already).
ANSWERED = ("schema", "wrong_topic", "stale", "unknown_deployment", "bad_artifact")
REASONS = (*protocol.REASONS, "unknown_deployment", "bad_artifact")


class AgentConfig(Model):
    """Everything ``edgeswarm agent`` is told (frozen, strict)."""

    name: str = Field(pattern=NAME)
    cluster: str = Field(default="default", pattern=NAME)
    broker: str | None = None             # mqtt://HOST:PORT; None with embedded_broker or
    embedded_broker: bool = False         # ... none at all: found through zeroconf
    broker_port: int = Field(default=1883, ge=0, le=65535)   # the embedded broker's port
    key: Path | None = None               # the key file (the key itself is passed apart)
    speed: float = Field(default=1.0, gt=0)
    #: runtimes this device is built for, first in its profile ("snn": spiking hardware)
    prefer_runtimes: list[str] = Field(default_factory=list)
    links: dict[str, LinkShape] = Field(default_factory=dict)  # emulated, by peer; "*": others
    data_host: str = "127.0.0.1"
    data_port: int = Field(default=0, ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    heartbeat_s: float = Field(default=0.5, gt=0)
    telemetry_s: float = Field(default=5.0, gt=0)
    interfaces: list[str] | None = None   # zeroconf interfaces (["127.0.0.1"] on loopback)
    advertise: bool = True
    artifacts_dir: Path | None = None
    profile_s: float = Field(default=0.3, gt=0)
    max_age_s: float = Field(default=30.0, gt=0)
    discover_s: float = Field(default=3.0, gt=0)

    @model_validator(mode="after")
    def _one_broker(self) -> AgentConfig:
        if self.broker is not None and self.embedded_broker:
            raise ValueError("give --broker or --embedded-broker, not both")
        for peer in self.links:
            if peer != "*" and re.fullmatch(topics.NAME_PATTERN, peer) is None:
                raise ValueError(f"links: {peer!r} is not a device id (or '*' for every peer)")
        return self

    def tls(self) -> TlsConfig | None:
        if self.tls_ca is None and self.tls_cert is None and self.tls_key is None:
            return None
        return TlsConfig(ca=self.tls_ca, cert=self.tls_cert, key=self.tls_key)


class Agent:
    """The daemon of one device. ``start()``, then ``stop()`` (or ``run(stop_event)``)."""

    def __init__(self, config: AgentConfig, key: bytes, *, clock: Any = time.time) -> None:
        self.config = config
        self._key = key
        self._clock = clock
        self.metrics = AgentMetrics(config.name, reasons=REASONS)
        self._guard = protocol.ReplayGuard(window_s=2 * config.max_age_s)
        self._work: queue.Queue[tuple[str, Deploy | Teardown] | None] = queue.Queue()
        self._warned: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._parts: list[Any] = []          # things to stop, in reverse order
        self.broker_uri = config.broker or ""
        self.profile: protocol.DeviceProfile | None = None
        self.control: ControlClient | None = None
        self.probe: DataProbe | None = None
        self._advertiser: Any = None   # discovery.Advertiser, imported only when used
        self.deployments: Deployments | None = None
        self._started = self._stopped = False
        self._seq = 0
        self._state_lock = threading.Lock()
        self._offline = False   # the "offline" state is published: the agent is stopping
        self._warm = WarmUp(self._warm_up_steps(), nice=WARM_UP_NICE,
                            name=f"edgeswarm-warm-up-{config.name}")

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Bring the agent up; on failure everything started so far is stopped again."""
        if self._started:
            raise InvalidInput("Agent.start() was already called; make a new Agent")
        self._started = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        from edgeswarm.device_agent import profile
        from edgeswarm.device_agent.artifacts import ArtifactStore

        cfg = self.config
        # int8 is measured after the announcement, in the warm-up (_warm_up_steps)
        self.profile = profile.measure(cfg.name, speed=cfg.speed, seconds=cfg.profile_s,
                                       measure_int8=False, prefer=cfg.prefer_runtimes)
        self.deployments = Deployments(
            cfg.name, ArtifactStore(cfg.artifacts_dir or _cache_dir()), self.metrics,
            runtimes=self.profile.runtimes, speed=cfg.speed, data_host=cfg.data_host,
            # shards compute on the threads the profile was measured with, so the planner's
            # FLOP/s are what they get (ONNX Runtime would otherwise take every core)
            threads=profile.blas_threads(), on_error=self._event)
        self.probe = DataProbe(cfg.data_host, cfg.data_port)
        self._parts.append(self.probe)
        if cfg.metrics_port is not None:
            self.metrics.serve(cfg.metrics_port, host=cfg.data_host)
            self._parts.append(self.metrics)
        self.broker_uri = self._broker()
        state_topic = topics.state(cfg.cluster, cfg.name)
        will = protocol.seal(self._key, state_topic, cfg.name, self._state("offline"),
                             self._clock())
        for attempt in range(CONNECT_ATTEMPTS):
            self.control = ControlClient(
                self.broker_uri, f"edgeswarm-{cfg.cluster}-{cfg.name}", key=self._key,
                username=cfg.username, password=_read_password(cfg.password_file),
                tls=cfg.tls(), will=(state_topic, will), clock=self._clock, sender=cfg.name)
            self.control.subscribe(topics.cmd(cfg.cluster, cfg.name), self._on_command)
            try:
                self.control.start()
                break
            except ConnectError as exc:
                # a broker busy accepting many clients at once can drop one before its
                # CONNACK (amqtt does); refused credentials or TLS fail the same way again
                transient = "no CONNACK" in str(exc) or "cannot connect" in str(exc)
                if attempt + 1 == CONNECT_ATTEMPTS or not transient:
                    raise
                log.warning("connecting to %s failed (%s); trying again", self.broker_uri, exc)
        assert self.control is not None  # set by the loop, or it raised
        self._parts.append(self.control)
        self._publish_state(wait=True)
        # after a reconnect: the will may have fired while the connection was down
        self.control.on_connect(lambda: self._publish_state(lock_timeout_s=1.0))
        for target, name in ((self._tick, "beat"), (self._work_loop, "work")):
            t = threading.Thread(target=target, daemon=True, name=f"edgeswarm-{name}-{cfg.name}")
            t.start()
            self._threads.append(t)
        if cfg.advertise:
            from edgeswarm.device_agent import discovery

            record = discovery.AgentRecord(
                device=cfg.name, cluster=cfg.cluster, version=edgeswarm.__version__,
                host=cfg.data_host, data_port=self.probe.port, broker=self.broker_uri,
                metrics_port=self.metrics_port)
            advertiser = discovery.Advertiser(record, interfaces=cfg.interfaces)
            advertiser.start(wait=False)   # probing takes ~1.7 s: MQTT need not wait
            self._parts.append(advertiser)
            self._advertiser = advertiser
        log.info("agent %s online in cluster %s via %s (data %s:%d)", cfg.name, cfg.cluster,
                 self.broker_uri, cfg.data_host, self.probe.port)

    def advertised(self, timeout_s: float = 10.0) -> bool:
        """Wait until zeroconf advertises this agent (start() does not wait for it)."""
        return self._advertiser is not None and self._advertiser.wait(timeout_s)

    def _broker(self) -> str:
        cfg = self.config
        if cfg.broker is not None:
            return cfg.broker
        from edgeswarm.device_agent import discovery

        if cfg.embedded_broker:
            from edgeswarm.device_agent.broker import EmbeddedBroker

            broker = EmbeddedBroker(host=cfg.data_host, port=cfg.broker_port)
            broker.start()
            self._parts.append(broker)
            if cfg.advertise:
                adv = discovery.BrokerAdvertiser(broker.uri, cfg.cluster,
                                                 interfaces=cfg.interfaces)
                adv.start(wait=False)
                self._parts.append(adv)
            return broker.uri
        # any agent of the cluster names its broker: the first answer is enough
        _, brokers = discovery.browse(cfg.cluster, timeout_s=cfg.discover_s,
                                      interfaces=cfg.interfaces, expect=1)
        if not brokers:
            raise Error(f"no MQTT broker for cluster {cfg.cluster!r} found through zeroconf "
                        f"within {cfg.discover_s:.1f} s: give --broker mqtt://HOST:PORT, or "
                        f"start one agent with --embedded-broker")
        return brokers[0]

    def stop(self) -> None:
        """Publish "offline", leave every deployment, stop everything; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        control = self.control
        if control is not None and control.connected:
            try:
                self._publish_state("offline", wait=True)
            except Error as exc:
                log.warning("could not publish the offline state: %s", exc)
        self._stop.set()
        self._work.put(None)
        self._warm.stop()   # a process must not exit in the middle of importing torch
        for t in self._threads:
            t.join(5)
        if self.deployments is not None:
            self.deployments.close_all()
        for part in reversed(self._parts):
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", type(part).__name__)
        self._parts.clear()
        log.info("agent %s stopped", self.config.name)

    def run(self, stop: threading.Event) -> None:
        """Start, serve until ``stop`` is set (SIGTERM/SIGINT in the CLI), then stop."""
        self.start()
        try:
            while not stop.wait(0.5):
                pass
        finally:
            self.stop()

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.config.metrics_port is not None else None

    def _deployments(self) -> Deployments:
        assert self.deployments is not None, "start() first"
        return self.deployments

    def _ids(self) -> list[str]:
        return [] if self.deployments is None else self.deployments.ids()

    # -- the control plane -----------------------------------------------------------
    def _state(self, status: str) -> DeviceState:
        assert self.profile is not None and self.probe is not None
        return DeviceState(status=status, device=self.profile,  # type: ignore[arg-type]
                           agent_version=edgeswarm.__version__, data_host=self.config.data_host,
                           data_port=self.probe.port, metrics_port=self.metrics_port,
                           heartbeat_s=self.config.heartbeat_s, deployments=self._ids(),
                           links=self.config.links)

    def _publish_state(self, status: str = "online", wait: bool = False,
                       lock_timeout_s: float = -1) -> None:
        """Publish the retained state. Once "offline" is out, no thread (the warm-up, a
        deploy ending) may publish "online" again. With ``lock_timeout_s`` (paho's thread,
        after a reconnect) the publish is skipped if another thread holds the state that
        long: that is stop() waiting for "offline" to be acknowledged, which paho's thread
        itself would have to deliver."""
        assert self.control is not None
        cfg = self.config
        if not self._state_lock.acquire(timeout=lock_timeout_s):
            return
        try:
            if self._offline:
                return
            self._offline = status == "offline"
            self.control.publish(topics.state(cfg.cluster, cfg.name), self._state(status),
                                 retain=True, wait=wait)
        finally:
            self._state_lock.release()

    def _event(self, body: Model) -> None:
        assert self.control is not None
        self.control.publish(topics.events(self.config.cluster, self.config.name), body)

    def _on_command(self, topic: str, raw: bytes) -> None:
        try:
            sender, command = protocol.unseal(self._key, topic, raw, self._clock(), self._guard,
                                              protocol.COMMAND, self.config.max_age_s)
        except Rejected as exc:
            self._reject(exc, _claimed_sender(raw))
            return
        match command:
            case Ping(seq=seq):
                self._event(protocol.Pong(seq=seq))
            case Deploy() | Teardown():
                log.debug("%s from %s", command.kind, sender)
                self._work.put((sender, command))

    def _reject(self, exc: Rejected, sender: str, deployment: str | None = None) -> None:
        self.metrics.reject(exc.reason)
        key = (sender, exc.reason)
        level = logging.DEBUG if key in self._warned else logging.WARNING
        if len(self._warned) < 10_000:
            self._warned.add(key)
        log.log(level, "rejected a command from %s: %s", sender, exc)
        if exc.reason in ANSWERED:
            self._event(ErrorEvent(reason=exc.reason, detail=exc.detail[:2000],
                                   deployment=deployment))

    # -- deployments (worker thread) -------------------------------------------------
    def _work_loop(self) -> None:
        self._warm.start()
        while not self._warm.wait(0.1) and not self._stop.is_set():
            pass
        while not self._stop.is_set():
            item = self._work.get()
            if item is None:
                return
            sender, command = item
            dep = command.manifest.deployment if isinstance(command, Deploy) \
                else command.deployment
            try:
                if isinstance(command, Deploy):
                    self._event(self._deployments().deploy(command.manifest))
                else:
                    self._deployments().teardown(command.deployment)
                    self._event(protocol.TornDown(deployment=dep))
            except Rejected as exc:  # bad_artifact, unknown_deployment
                self._reject(exc, sender, deployment=dep)
                continue
            except Error as exc:
                log.warning("%s of %s failed: %s", command.kind, dep, exc)
                self._event(ErrorEvent(reason=reason_of(exc), detail=str(exc)[:2000],
                                       deployment=dep))
                continue
            except Exception as exc:  # a bug: report it, keep serving
                log.exception("%s of %s failed", command.kind, dep)
                self._event(ErrorEvent(reason="deploy_failed", detail=repr(exc)[:2000],
                                       deployment=dep))
                continue
            self._publish_state()  # the state lists the deployments

    def _warm_up_steps(self) -> list[Any]:
        """What the agent does once it is online (:mod:`.warm_up`): measure the profile's
        int8 throughput and publish it, then import what a deploy needs (torch's gloo, ONNX
        Runtime), so that the first deploy does not wait for them: ~2 s here, and that
        first deploy is often a recovery, with requests waiting. Commands queue meanwhile."""
        return [self._measure_int8,
                functools.partial(self._preload, "edgeswarm.device_agent.dataplane"),
                *(functools.partial(self._preload, m, runtime="onnx")
                  for m in ("onnxruntime", "edgeswarm.models.runtimes.onnx_runtime"))]

    def _preload(self, module: str, runtime: str | None = None) -> None:
        """Import ``module`` (if this device has ``runtime``); a failure is the deploy's to
        report."""
        import importlib

        if runtime is not None and (self.profile is None or runtime not in self.profile.runtimes):
            return
        try:
            importlib.import_module(module)
        except Exception as exc:
            log.debug("preloading %s failed: %s", module, exc)

    def _measure_int8(self) -> None:
        """Complete the profile with its int8 throughput and publish the new state."""
        from edgeswarm.device_agent import profile

        if self.profile is None or self._stop.is_set():
            return
        try:
            self.profile = profile.with_int8(self.profile, seconds=self.config.profile_s / 2)
            if not self._stop.is_set():
                self._publish_state()
        except Exception as exc:  # the profile stays as announced (int8_ops 0.0)
            log.warning("measuring int8 throughput failed: %s", exc)

    # -- heartbeats, telemetry, metrics ----------------------------------------------
    def _tick(self) -> None:
        cfg = self.config
        hb_topic = topics.heartbeat(cfg.cluster, cfg.name)
        next_telemetry = time.monotonic() + cfg.telemetry_s
        while not self._stop.wait(cfg.heartbeat_s):
            assert self.control is not None
            try:
                self.control.publish(hb_topic, protocol.Heartbeat(
                    seq=self._seq, deployments=self._ids()), qos=topics.QOS["heartbeat"])
                self._seq += 1
                self.metrics.heartbeat()
                if time.monotonic() >= next_telemetry:
                    next_telemetry = time.monotonic() + cfg.telemetry_s
                    self._event(self._telemetry())
            except Exception:
                log.exception("heartbeat failed")

    def _telemetry(self) -> protocol.Telemetry:
        import psutil

        requests, shards = self._deployments().report()
        proc = psutil.Process()
        return protocol.Telemetry(requests=requests, shards=shards,
                                  rss_bytes=proc.memory_info().rss,
                                  cpu_percent=proc.cpu_percent(interval=None))


def _claimed_sender(raw: bytes) -> str:
    """The sender a rejected message claims (unverified; for log lines only)."""
    if len(raw) > protocol.MAX_MESSAGE_BYTES:
        return "?"
    try:
        sender = json.loads(raw).get("sender")
    except (ValueError, AttributeError, RecursionError):
        return "?"
    return sender[:64] if isinstance(sender, str) and sender.isprintable() else "?"


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip("\r\n")
    except OSError as exc:
        raise InvalidInput(f"cannot read the password file {path}: {exc.strerror or exc}") \
            from None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgeswarm" / "artifacts"
