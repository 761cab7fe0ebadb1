"""The control-plane protocol: message schemas, the signed envelope, the replay guard.

No I/O: bytes in, typed messages out (``unseal``), and typed messages in, bytes out
(``seal``). The MQTT glue lives in ``control``.

Every message on the wire, in every direction, is one JSON envelope::

    {"v": 1, "sender": "pi-3", "topic": "edgeswarm/v1/lab/devices/pi-3/cmd",
     "ts": 1718000000.25, "nonce": "<32 hex>", "body": {"kind": "ping", "seq": 7},
     "sig": "<64 hex>"}

``sig`` is HMAC-SHA256 under the cluster key of the canonical JSON (sorted keys, no
spaces) of every other field. The topic is signed, so a command captured for one device
cannot be replayed to another; ``ts`` and ``nonce`` bound how long, and how often, a
captured message is accepted. The HMAC gives integrity and authenticity, not secrecy:
anyone on the broker can read the messages unless the broker connection uses TLS.
"""

from __future__ import annotations

import heapq
import json
import math
import secrets
from typing import Annotated, Any, Literal, NewType, TypeVar, overload

from pydantic import Field, TypeAdapter, ValidationError

from edgeswarm.device_agent._signing import (
    REASONS,
    Model,
    Rejected,
    canonical,
    describe,
    digest,
    signature_matches,
)
from edgeswarm.device_agent.manifest import LinkShape, Manifest
from edgeswarm.device_agent.topics import NAME_PATTERN, check_name
from edgeswarm.placement.cluster import Device, DeviceId
from edgeswarm.placement.errors import InvalidInput

__all__ = [
    "COMMAND", "EVENT", "MAX_MESSAGE_BYTES", "PROTOCOL_VERSION", "REASONS", "Command",
    "Deploy", "Deployed", "DeploymentId", "DeviceProfile", "DeviceState", "Envelope",
    "ErrorEvent", "Event", "Heartbeat", "Model", "Ping", "Pong", "Rejected", "ReplayGuard",
    "ShardStats", "Teardown", "Telemetry", "TornDown", "parse_command", "parse_event", "seal",
    "unseal",
]

DeploymentId = NewType("DeploymentId", str)

MAX_MESSAGE_BYTES = 1 << 20
PROTOCOL_VERSION = 1

T = TypeVar("T")
M = TypeVar("M", bound=Model)


# --- commands: coordinator -> devices/<id>/cmd ---------------------------------------------

class Ping(Model):
    """Are you there? Answered by a Pong with the same seq."""

    kind: Literal["ping"] = "ping"
    seq: int = Field(ge=0)


class Deploy(Model):
    """Fetch, verify and load this device's shards, then join the generation's group."""

    kind: Literal["deploy"] = "deploy"
    manifest: Manifest


class Teardown(Model):
    """Leave the deployment's group and unload its shards."""

    kind: Literal["teardown"] = "teardown"
    deployment: str


Command = Annotated[Ping | Deploy | Teardown, Field(discriminator="kind")]


# --- events: agent -> devices/<id>/events --------------------------------------------------

class Pong(Model):
    kind: Literal["pong"] = "pong"
    seq: int = Field(ge=0)


class Deployed(Model):
    """The device loaded its shards of this generation and joined its group."""

    kind: Literal["deployed"] = "deployed"
    deployment: str
    generation: int = Field(ge=0)
    shards: list[str]
    load_s: float = Field(ge=0)


class TornDown(Model):
    kind: Literal["torn_down"] = "torn_down"
    deployment: str


class ErrorEvent(Model):
    """Something the device refused or failed at; ``reason`` as in ``Rejected.reason``."""

    kind: Literal["error"] = "error"
    reason: str
    detail: str
    deployment: str | None = None


class ShardStats(Model):
    runs: int = Field(ge=0)
    compute_s: float = Field(ge=0)
    bytes_in: int = Field(ge=0)
    bytes_out: int = Field(ge=0)


class Telemetry(Model):
    kind: Literal["telemetry"] = "telemetry"
    requests: int = Field(ge=0)
    shards: dict[str, ShardStats]
    rss_bytes: int = Field(ge=0)
    cpu_percent: float = Field(ge=0)


Event = Annotated[Pong | Deployed | TornDown | ErrorEvent | Telemetry,
                  Field(discriminator="kind")]


# --- state (retained) and heartbeat: agent -> devices/<id>/{state,heartbeat} ---------------

class DeviceProfile(Model):
    """What the agent measured at start: the placement ``Device`` plus detail."""

    id: str = Field(pattern=rf"^{NAME_PATTERN}$")
    flops: float = Field(gt=0)         # fp32 FLOP/s, already multiplied by speed
    int8_ops: float = Field(ge=0)      # int8 ops/s, already multiplied by speed
    memory_bytes: int = Field(ge=0)    # available memory
    runtimes: list[str]
    cores: int = Field(ge=1)
    speed: float = Field(gt=0)         # the --speed factor; 1.0 = not emulated
    platform: str

    def to_device(self) -> Device:
        return Device(id=DeviceId(self.id), flops=self.flops, memory_bytes=self.memory_bytes,
                      runtimes=tuple(self.runtimes))


class DeviceState(Model):
    status: Literal["online", "offline"]
    device: DeviceProfile
    agent_version: str
    data_host: str
    data_port: int = Field(ge=0, le=65535)
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    heartbeat_s: float = Field(gt=0)
    deployments: list[str] = Field(default_factory=list)
    # outgoing data-plane links this agent emulates, by peer device id; key "*" for every
    # other peer, including the coordinator (testbed only; empty on a real device)
    links: dict[str, LinkShape] = Field(default_factory=dict)


class Heartbeat(Model):
    kind: Literal["heartbeat"] = "heartbeat"
    seq: int = Field(ge=0)
    deployments: list[str] = Field(default_factory=list)


COMMAND: TypeAdapter[Command] = TypeAdapter(Command)
EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_command(data: dict[str, Any] | bytes | str) -> Command:
    """A command body (a dict, or its JSON) as its typed message; Rejected("schema") if not."""
    return _validate(COMMAND, data)


def parse_event(data: dict[str, Any] | bytes | str) -> Event:
    """An event body (a dict, or its JSON) as its typed message; Rejected("schema") if not."""
    return _validate(EVENT, data)


def _validate(adapter: TypeAdapter[T], data: dict[str, Any] | bytes | str) -> T:
    if isinstance(data, (bytes, str)):
        data = _loads(data)
    try:
        return adapter.validate_python(data)
    except ValidationError as e:
        raise Rejected("schema", describe(e)) from None


# --- the envelope ---------------------------------------------------------------------------

class Envelope(Model):
    """The signed wrapper of every message (``sig`` is checked apart, see ``unseal``)."""

    v: Literal[1]
    sender: str = Field(pattern=rf"^{NAME_PATTERN}$")
    topic: str = Field(max_length=512)
    ts: float = Field(allow_inf_nan=False)
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$")
    body: dict[str, Any]


def seal(key: bytes, topic: str, sender: str, body: Model, now: float,
         nonce: str | None = None) -> bytes:
    """The signed envelope of ``body`` for ``topic``, as bytes to publish.

    ``nonce`` (32 lowercase hex) defaults to 16 fresh random bytes; pass one only in tests.
    Raises InvalidInput for a bad sender or nonce, a body that is not plain JSON (NaN) or
    a message larger than MAX_MESSAGE_BYTES.
    """
    check_name(sender, "sender")
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif len(nonce) != 32 or any(c not in "0123456789abcdef" for c in nonce):
        raise InvalidInput(f"nonce {nonce!r} must be 32 lowercase hex characters")
    if not math.isfinite(now):
        raise InvalidInput(f"timestamp {now!r} is not a finite number")
    envelope: dict[str, Any] = {"v": PROTOCOL_VERSION, "sender": sender, "topic": topic,
                                "ts": float(now), "nonce": nonce,
                                "body": body.model_dump(mode="json")}
    try:
        envelope["sig"] = digest(key, envelope)
        raw = canonical(envelope)
    except ValueError as e:
        raise InvalidInput(f"{type(body).__name__} is not plain JSON: {e}") from None
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidInput(f"{type(body).__name__} message is {len(raw)} bytes; peers reject "
                           f"more than {MAX_MESSAGE_BYTES}")
    return raw


@overload
def unseal(key: bytes, topic: str, raw: bytes, now: float, guard: ReplayGuard | None,
           kind: type[M], max_age_s: float | None = 30.0) -> tuple[str, M]: ...
@overload
def unseal(key: bytes, topic: str, raw: bytes, now: float, guard: ReplayGuard | None,
           kind: TypeAdapter[T], max_age_s: float | None = 30.0) -> tuple[str, T]: ...
def unseal(key: bytes, topic: str, raw: bytes, now: float, guard: ReplayGuard | None,
           kind: type[Model] | TypeAdapter[Any],
           max_age_s: float | None = 30.0) -> tuple[str, Any]:
    """Verify an envelope received on ``topic``; return ``(sender, body as kind)``.

    Checks, in order, raising Rejected with that reason: size ("oversized"), JSON
    ("malformed"), envelope shape ("malformed"), signature present ("unsigned") and valid
    ("bad_signature"), topic ("wrong_topic"), ``|now - ts| <= max_age_s`` ("stale";
    skipped when max_age_s is None, for retained state and the last will), nonce unseen
    ("replayed"; skipped when guard is None), body ("schema").
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Rejected("oversized", f"{len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    data = _loads(raw)
    if not isinstance(data, dict):
        raise Rejected("malformed", f"the envelope is a JSON {type(data).__name__}, "
                       "not an object")
    sig = data.pop("sig", None)
    try:
        envelope = Envelope.model_validate(data)
    except ValidationError as e:
        raise Rejected("malformed", f"bad envelope: {describe(e)}") from None
    if sig is None or sig == "":
        raise Rejected("unsigned", f"message from {envelope.sender!r} on {topic} has no "
                       "signature; every message must be signed with the cluster key")
    if not isinstance(sig, str) or not signature_matches(key, data, sig):
        raise Rejected("bad_signature", f"message from {envelope.sender!r} on {topic}: the "
                       "signature does not match (tampered, or another cluster key)")
    if envelope.topic != topic:
        raise Rejected("wrong_topic", f"message from {envelope.sender!r} was signed for "
                       f"{envelope.topic!r} but arrived on {topic!r}")
    if max_age_s is not None and abs(now - envelope.ts) > max_age_s:
        age = now - envelope.ts
        where = f"{age:.1f} s old" if age > 0 else f"{-age:.1f} s in the future"
        raise Rejected("stale", f"message from {envelope.sender!r} is {where}; the limit is "
                       f"{max_age_s} s (check the clocks, e.g. NTP)")
    if guard is not None:
        guard.check(envelope.nonce, envelope.ts, now)
    try:
        if isinstance(kind, TypeAdapter):
            body = kind.validate_python(envelope.body)
        else:
            body = kind.model_validate(envelope.body)
    except ValidationError as e:
        raise Rejected("schema", f"message from {envelope.sender!r} on {topic}: "
                       f"{describe(e)}") from None
    return envelope.sender, body


def _loads(raw: bytes | str) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys; Rejected("malformed") if not."""
    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(raw, parse_constant=constant, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
        raise Rejected("malformed", f"not JSON: {e}") from None


# --- replay protection ---------------------------------------------------------------------

class ReplayGuard:
    """Remembers the nonces of accepted messages so that none is accepted twice.

    A nonce is remembered while its message could still pass the freshness check:
    ``window_s`` must be at least the ``max_age_s`` given to ``unseal``. Memory is bounded
    by ``capacity``: when full, the nonce with the oldest timestamp is forgotten and every
    message not newer than it is refused from then on (it could be a replay the guard no
    longer remembers) — the guard fails closed, never open.
    """

    def __init__(self, window_s: float = 60.0, capacity: int = 100_000) -> None:
        if window_s <= 0 or capacity < 1:
            raise InvalidInput(f"ReplayGuard needs window_s > 0 and capacity >= 1, "
                               f"got {window_s} and {capacity}")
        self.window_s = window_s
        self.capacity = capacity
        self._seen: dict[str, float] = {}           # nonce -> ts
        self._by_ts: list[tuple[float, str]] = []   # heap of (ts, nonce)
        self._floor = -math.inf                     # ts at or below this is refused

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, nonce: str, ts: float, now: float) -> None:
        """Accept ``nonce`` once (remembering it) or raise Rejected."""
        self._expire(now)
        if abs(now - ts) > self.window_s:
            raise Rejected("stale", f"timestamp {ts} is more than {self.window_s} s from now "
                           f"({now}): outside the replay window")
        if nonce in self._seen:
            raise Rejected("replayed", f"nonce {nonce} was already used")
        if ts <= self._floor:
            raise Rejected("replayed", f"timestamp {ts} is older than the replay guard can "
                           f"vouch for ({self._floor}); more than {self.capacity} messages "
                           f"arrived within {self.window_s} s")
        if len(self._seen) >= self.capacity:
            oldest = self._by_ts[0][0]
            if ts <= oldest:
                raise Rejected("replayed", f"timestamp {ts} is not newer than the oldest "
                               f"remembered nonce and the replay guard is full "
                               f"({self.capacity} nonces within {self.window_s} s)")
            _, forgotten = heapq.heappop(self._by_ts)
            del self._seen[forgotten]
            self._floor = max(self._floor, oldest)
        self._seen[nonce] = ts
        heapq.heappush(self._by_ts, (ts, nonce))

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._by_ts and self._by_ts[0][0] < horizon:
            _, nonce = heapq.heappop(self._by_ts)
            del self._seen[nonce]
