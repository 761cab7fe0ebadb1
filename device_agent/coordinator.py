"""The coordinator: the control-plane client that watches a cluster and commands its devices.

It subscribes to every device's retained state, heartbeat and events, unseals each message,
turns it into a membership event and folds it with the pure reducer
(:mod:`edgeswarm.device_agent.membership`); a timer runs :func:`membership.expire` every
``expire_every_s`` so a device whose heartbeats stop is reported lost. A device killed
outright is seen sooner: the broker publishes its last will (a retained "offline" state
sealed when the agent connected) as soon as the TCP connection drops. That will is told
apart from the "offline" a clean stop publishes by its signed timestamp: the will was
sealed *before* the device's current "online" state, a clean stop's state after it.

Commands go out signed: :meth:`ping` (round trip of a signed Ping/Pong), :meth:`deploy`
(a manifest to every device in it, then wait for each one's Deployed or ErrorEvent) and
:meth:`teardown`. As rank 0 of a deployment the coordinator also hosts the rendezvous store
(:meth:`store_endpoint`) and, through :class:`Rank0`, joins the generation's gloo group,
feeds the first stage and collects the last (:meth:`infer`). :meth:`measure_link` times the
link to a device through its data probe.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeswarm.device_agent import membership as ms
from edgeswarm.device_agent import probe, protocol, topics
from edgeswarm.device_agent.control import ControlClient, TlsConfig
from edgeswarm.device_agent.manifest import COORDINATOR, Manifest
from edgeswarm.device_agent.protocol import (
    Deployed,
    DeviceState,
    ErrorEvent,
    Pong,
    Rejected,
    Telemetry,
    TornDown,
)
from edgeswarm.device_agent.rank0 import Rank0
from edgeswarm.placement.cluster import LinkSpec
from edgeswarm.placement.errors import DeviceLost, Error, InvalidInput

if TYPE_CHECKING:
    from edgeswarm.device_agent.dataplane import StoreHost

log = logging.getLogger("edgeswarm.agent.coordinator")

ChangeCallback = Callable[[ms.Membership, ms.Event], None]


class WaitTimeout(Error):
    """What the coordinator waited for (devices, replies) did not happen in time."""


class DeployFailed(Error):
    """Some devices refused or failed a deployment; ``errors`` holds their ErrorEvents."""

    def __init__(self, message: str, errors: dict[str, ErrorEvent], missing: list[str]) -> None:
        super().__init__(message)
        self.errors = errors
        self.missing = missing


class Coordinator:
    """Watches one cluster on one broker; sends it signed commands."""

    def __init__(self, broker: str, cluster: str, key: bytes, *, name: str = COORDINATOR,
                 heartbeat_timeout_s: float = 1.5, clock: Callable[[], float] = time.monotonic,
                 tls: TlsConfig | None = None, username: str | None = None,
                 password: str | None = None, expire_every_s: float = 0.1,
                 data_host: str = "127.0.0.1", wall_clock: Callable[[], float] = time.time,
                 max_age_s: float = 30.0) -> None:
        self.cluster = topics.check_name(cluster, "cluster name")
        self.name = topics.check_name(name, "coordinator name")
        self.data_host = data_host
        self._key = key
        self._clock = clock
        self._wall = wall_clock
        self._timeout_s = heartbeat_timeout_s
        self._expire_every_s = expire_every_s
        self._max_age_s = max_age_s
        self._control = ControlClient(
            broker, f"edgeswarm-{cluster}-{name}-{secrets.token_hex(4)}", key=key,
            username=username, password=password, tls=tls, clock=wall_clock, sender=name)
        self._guard = protocol.ReplayGuard(window_s=2 * max_age_s)
        self._cv = threading.Condition()
        self._membership = ms.Membership()
        self._online_ts: dict[str, float] = {}     # device -> ts of its current "online" state
        self._callbacks: list[ChangeCallback] = []
        self._seq = itertools.count()
        self._pongs: dict[tuple[str, int], float | None] = {}
        self._replies: dict[str, dict[str, protocol.Model]] = {}
        self.telemetry: dict[str, Telemetry] = {}
        self.errors: deque[tuple[str, ErrorEvent]] = deque(maxlen=100)
        self.rejected: Counter[str] = Counter()
        self._warned: set[tuple[str, str]] = set()
        self._store: StoreHost | None = None
        self._rank0: dict[str, Rank0] = {}
        self._abandoned: list[Rank0] = []
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Connect, subscribe to the cluster and start the expiry timer."""
        c = self._control
        c.subscribe(topics.all_states(self.cluster), self._on_state)
        c.subscribe(topics.all_heartbeats(self.cluster), self._on_heartbeat)
        c.subscribe(topics.all_events(self.cluster), self._on_event)
        c.start()
        self._timer = threading.Thread(target=self._expire_loop, daemon=True,
                                       name=f"edgeswarm-expire-{self.cluster}")
        self._timer.start()

    def stop(self) -> None:
        """Leave every gloo group, disconnect, stop the timer and the rendezvous store."""
        for rank0 in [*self._rank0.values(), *self._abandoned]:
            rank0.close()
        self._rank0.clear()
        self._abandoned.clear()
        self._stop.set()
        if self._timer is not None:
            self._timer.join(5)
        self._control.stop()
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> Coordinator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- membership ------------------------------------------------------------------
    @property
    def membership(self) -> ms.Membership:
        with self._cv:
            return self._membership

    def devices(self) -> list[DeviceState]:
        """The states of the devices online now."""
        return ms.online(self.membership)

    def on_change(self, callback: ChangeCallback) -> None:
        """Call ``callback(membership, event)`` whenever the set of online devices changes.

        It runs in the thread that saw the change (paho's or the expiry timer's): keep it short.
        """
        with self._cv:
            self._callbacks.append(callback)

    def wait_for(self, n: int, timeout_s: float) -> list[DeviceState]:
        """Wait until at least ``n`` devices are online; return their states."""
        with self._cv:
            if not self._cv.wait_for(lambda: len(self._membership.online_ids()) >= n,
                                     timeout_s):
                seen = self._membership.online_ids()
                raise WaitTimeout(
                    f"only {len(seen)} of {n} devices online in cluster {self.cluster!r} after "
                    f"{timeout_s:.1f} s ({', '.join(seen) or 'none'}); are the agents running "
                    f"with --cluster {self.cluster}, this broker and the same key file?")
            return ms.online(self._membership)

    # -- commands --------------------------------------------------------------------
    def ping(self, device: str, timeout_s: float = 2.0) -> float:
        """Round-trip seconds of a signed Ping answered by a signed Pong from ``device``."""
        seq = next(self._seq)
        key = (device, seq)
        with self._cv:
            self._pongs[key] = None
        try:
            t0 = time.perf_counter()
            self._control.publish(topics.cmd(self.cluster, device), protocol.Ping(seq=seq))
            with self._cv:
                if not self._cv.wait_for(lambda: self._pongs[key] is not None, timeout_s):
                    raise DeviceLost(f"device {device!r} did not answer a ping within "
                                     f"{timeout_s:.1f} s; is it online (edgeswarm devices)?")
                arrived = self._pongs[key]
            assert arrived is not None
            return arrived - t0
        finally:
            with self._cv:
                self._pongs.pop(key, None)

    def measure_link(self, device: str, nbytes: int = 1 << 20, rounds: int = 5,
                     timeout_s: float = 5.0) -> LinkSpec:
        """Latency and bandwidth from here to ``device``, through its data probe."""
        member = self.membership.members.get(device)
        if member is None or member.status != "online":
            raise DeviceLost(f"device {device!r} is not online; cannot measure its link")
        return probe.measure_link(member.state.data_host, member.state.data_port, nbytes,
                                  rounds, timeout_s)

    def store_endpoint(self) -> tuple[str, int]:
        """``(host, port)`` of the rendezvous store this coordinator hosts (started once)."""
        if self._store is None:
            from edgeswarm.device_agent.dataplane import StoreHost

            self._store = StoreHost(host=self.data_host, port=0)
        return self.data_host, self._store.port

    def deploy(self, manifest: Manifest, timeout_s: float = 60.0,
               join: bool = True) -> dict[str, Deployed]:
        """Send ``manifest`` to each of its devices and wait for every Deployed.

        With ``join`` the coordinator takes rank 0 in the generation's gloo group (needed
        before any device can finish joining). Raises DeployFailed carrying the devices'
        ErrorEvents (and naming the silent ones); the devices that did deploy are told to
        tear down again.
        """
        devices = sorted(d for d in manifest.ranks if d != COORDINATOR)
        with self._cv:
            self._replies[manifest.deployment] = {}
        body = protocol.Deploy(manifest=manifest)
        for device in devices:
            self._control.publish(topics.cmd(self.cluster, device), body)
        rank0 = Rank0(manifest, host=self.data_host) if join else None
        replies = self._await_replies(manifest.deployment, devices, timeout_s,
                                      lambda r: isinstance(r, ErrorEvent) or (
                                          isinstance(r, Deployed)
                                          and r.generation == manifest.generation))
        deployed = {d: r for d, r in replies.items() if isinstance(r, Deployed)}
        errors = {d: r for d, r in replies.items() if isinstance(r, ErrorEvent)}
        missing = [d for d in devices if d not in replies]
        if rank0 is not None and not errors and not missing \
                and not rank0.joined(manifest.timeout_s + 5):
            errors[COORDINATOR] = ErrorEvent(reason="deploy_failed", detail=rank0.error,
                                             deployment=manifest.deployment)
        if errors or missing:
            if rank0 is not None:
                self._abandoned.append(rank0)  # its join times out; stop() collects it
            for device in deployed:
                self._control.publish(topics.cmd(self.cluster, device),
                                      protocol.Teardown(deployment=manifest.deployment))
            raise DeployFailed(f"deployment {manifest.deployment!r} generation "
                               f"{manifest.generation} failed: "
                               + self._failures(errors, missing, timeout_s), errors, missing)
        if rank0 is not None:
            old = self._rank0.pop(manifest.deployment, None)
            self._rank0[manifest.deployment] = rank0
            if old is not None:
                old.close()
        return deployed

    def infer(self, deployment: str, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run one request through a deployment joined as rank 0; return the last outputs."""
        rank0 = self._rank0.get(deployment)
        if rank0 is None:
            raise InvalidInput(f"deployment {deployment!r} is not joined by this coordinator; "
                               f"deploy it first (joined: {', '.join(self._rank0) or 'none'})")
        return rank0.infer(arrays)

    def teardown(self, deployment: str, devices: Sequence[str] | None = None,
                 timeout_s: float = 10.0) -> dict[str, TornDown]:
        """Stop the pipeline, leave the group and tell each device to drop the deployment.

        With ``devices`` given, only those devices are told and this coordinator's end of
        the pipeline stays up (a new generation dropping devices the old one used)."""
        rank0 = self._rank0.pop(deployment, None) if devices is None else None
        if rank0 is not None:
            rank0.shutdown()
            if devices is None:
                devices = sorted(d for d in rank0.manifest.ranks if d != COORDINATOR)
        if devices is None:
            raise InvalidInput(f"deployment {deployment!r} was not joined by this coordinator: "
                               f"name its devices")
        with self._cv:
            self._replies[deployment] = {}
        for device in devices:
            self._control.publish(topics.cmd(self.cluster, device),
                                  protocol.Teardown(deployment=deployment))
        replies = self._await_replies(deployment, list(devices), timeout_s,
                                      lambda r: isinstance(r, (TornDown, ErrorEvent)))
        errors = {d: r for d, r in replies.items() if isinstance(r, ErrorEvent)}
        missing = [d for d in devices if d not in replies]
        if errors or missing:
            raise DeployFailed(f"teardown of {deployment!r} failed: "
                               + self._failures(errors, missing, timeout_s), errors, missing)
        return {d: r for d, r in replies.items() if isinstance(r, TornDown)}

    # -- internals -------------------------------------------------------------------
    def _await_replies(self, deployment: str, devices: list[str], timeout_s: float,
                       final: Callable[[protocol.Model], bool]) -> dict[str, protocol.Model]:
        """The final replies of ``devices``; returns once each device has answered or has
        been lost or has left (a dead device never answers: waiting out the timeout for it
        only delays the caller's retry), or after ``timeout_s``."""
        def done() -> bool:
            got = self._replies.get(deployment, {})
            gone = self._gone(devices)
            return all((d in got and final(got[d])) or d in gone for d in devices)

        with self._cv:
            self._cv.wait_for(done, timeout_s)
            got = self._replies.pop(deployment, {})
        return {d: r for d, r in got.items() if d in devices and final(r)}

    def _gone(self, devices: Sequence[str]) -> set[str]:
        """Those of ``devices`` the membership knows as lost or left (not: never seen)."""
        members = self._membership.members
        return {d for d in devices if d in members and members[d].status != "online"}

    def _failures(self, errors: dict[str, ErrorEvent], missing: list[str],
                  timeout_s: float) -> str:
        with self._cv:
            gone = self._gone(missing)
        return _failures(errors, missing, timeout_s, sorted(gone))

    def _apply(self, event: ms.Event) -> None:
        with self._cv:
            before = self._membership
            after = ms.apply(before, event)
            self._membership = after
            changed = after.generation != before.generation
            callbacks = list(self._callbacks) if changed else []
            self._cv.notify_all()
        if changed:
            if isinstance(event, ms.DeviceLost):
                log.warning("device %s lost: %s", event.device, event.why)
            else:
                log.info("%s: %s", type(event).__name__, event.device)
        for cb in callbacks:
            cb(after, event)

    def _expire_loop(self) -> None:
        while not self._stop.wait(self._expire_every_s):
            with self._cv:
                before = self._membership
                after, lost = ms.expire(before, self._clock(), self._timeout_s)
                self._membership = after
                callbacks = list(self._callbacks)
                self._cv.notify_all()
            for event in lost:
                log.warning("device %s lost: %s", event.device, event.why)
                for cb in callbacks:
                    cb(after, event)

    def _unseal(self, topic: str, raw: bytes, kind: Any, fresh: bool) -> tuple[str, Any] | None:
        try:
            _, device, _ = topics.parse(topic)
            sender, body = protocol.unseal(
                self._key, topic, raw, self._wall(), self._guard if fresh else None, kind,
                self._max_age_s if fresh else None)
        except (Rejected, InvalidInput) as exc:
            reason = getattr(exc, "reason", "wrong_topic")
            self.rejected[reason] += 1
            key = (topic, reason)
            level = logging.DEBUG if key in self._warned else logging.WARNING
            if len(self._warned) < 10_000:
                self._warned.add(key)
            log.log(level, "rejected a message on %s: %s", topic, exc)
            return None
        if sender != device:
            self.rejected["wrong_sender"] += 1
            log.warning("rejected a message on %s sent by %r", topic, sender)
            return None
        return device, body

    def _on_state(self, topic: str, raw: bytes) -> None:
        if not raw:
            return  # a cleared retained message
        got = self._unseal(topic, raw, DeviceState, fresh=False)
        if got is None:
            return
        device, state = got
        ts = float(json.loads(raw)["ts"])
        with self._cv:
            if state.status == "online":
                self._online_ts[device] = ts
                event: ms.Event = ms.DeviceSeen(device, state, self._clock())
            elif ts < self._online_ts.get(device, float("-inf")):
                event = ms.DeviceLost(device, self._clock(),
                                      "last will: its connection to the broker dropped")
            else:
                event = ms.DeviceLeft(device, self._clock())
        self._apply(event)

    def _on_heartbeat(self, topic: str, raw: bytes) -> None:
        got = self._unseal(topic, raw, protocol.Heartbeat, fresh=True)
        if got is not None:
            self._apply(ms.HeartbeatSeen(got[0], self._clock()))

    def _on_event(self, topic: str, raw: bytes) -> None:
        got = self._unseal(topic, raw, protocol.EVENT, fresh=True)
        arrived = time.perf_counter()  # a ping's round trip includes checking the pong
        if got is None:
            return
        device, event = got
        with self._cv:
            if isinstance(event, Pong):
                if (device, event.seq) in self._pongs:
                    self._pongs[(device, event.seq)] = arrived
            elif isinstance(event, Telemetry):
                self.telemetry[device] = event
            elif isinstance(event, (Deployed, TornDown)) or event.deployment is not None:
                replies = self._replies.get(event.deployment)
                if replies is not None:
                    replies[device] = event
            if isinstance(event, ErrorEvent):
                self.errors.append((device, event))
            self._cv.notify_all()
        if isinstance(event, ErrorEvent):
            log.warning("device %s reports %s: %s", device, event.reason, event.detail)


def _failures(errors: dict[str, ErrorEvent], missing: list[str], timeout_s: float,
              offline: Sequence[str] = ()) -> str:
    parts = [f"{d}: {e.reason}: {e.detail}" for d, e in sorted(errors.items())]
    gone = [d for d in missing if d in offline]
    silent = [d for d in missing if d not in offline]
    if gone:
        parts.append(f"{', '.join(gone)} went offline before answering (lost or left)")
    if silent:
        parts.append(f"no answer within {timeout_s:.1f} s from {', '.join(silent)}")
    return "; ".join(parts)
