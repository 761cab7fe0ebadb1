"""The signed envelope: every message kind round-trips, every rejection reason is raised
by real bytes, and the replay guard remembers what it must and no more."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Literal

import pytest

from edgeswarm.device_agent import topics
from edgeswarm.device_agent.manifest import Manifest
from edgeswarm.device_agent.protocol import (
    COMMAND,
    EVENT,
    MAX_MESSAGE_BYTES,
    REASONS,
    Deploy,
    Deployed,
    DeviceProfile,
    DeviceState,
    ErrorEvent,
    Heartbeat,
    Model,
    Ping,
    Pong,
    Rejected,
    ReplayGuard,
    ShardStats,
    Teardown,
    Telemetry,
    TornDown,
    parse_command,
    parse_event,
    seal,
    unseal,
)
from edgeswarm.placement.errors import InvalidInput, ProtocolError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
CMD = topics.cmd("lab", "pi-1")
NONCE = "0123456789abcdef0123456789abcdef"

def rejected(reason: str, fn: Any, *args: Any, **kwargs: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        fn(*args, **kwargs)
    assert info.value.reason == reason, str(info.value)
    assert isinstance(info.value, ProtocolError)
    assert str(info.value).startswith(f"{reason}: ")
    assert reason in REASONS
    return info.value


def sign_by_hand(key: bytes, envelope: dict[str, Any]) -> bytes:
    """The documented rule, written independently: HMAC-SHA256 over sorted, compact JSON."""
    body = {k: v for k, v in envelope.items() if k != "sig"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    sig = hmac.new(key, text.encode(), hashlib.sha256).hexdigest()
    return json.dumps({**body, "sig": sig}).encode()


def envelope(body: dict[str, Any], topic: str = CMD, ts: float = NOW,
             nonce: str = NONCE, **extra: Any) -> dict[str, Any]:
    return {"v": 1, "sender": "coordinator", "topic": topic, "ts": ts, "nonce": nonce,
            "body": body, **extra}


def manifest() -> Manifest:
    artifact = {"name": "stage0.onnx", "sha256": "ab" * 32, "size": 1234,
                "url": "http://127.0.0.1:8000/" + "ab" * 32}
    return Manifest.model_validate({
        "deployment": "d1", "generation": 2, "model": "mlp", "store_host": "127.0.0.1",
        "store_port": 29500, "world_size": 2, "ranks": {"coordinator": 0, "pi-1": 1},
        "shards": [{"id": "s0", "device": "pi-1", "runtime": "onnx", "artifact": artifact,
                    "recv_from": [0], "send_to": [0]}],
    })


def profile() -> DeviceProfile:
    return DeviceProfile(id="pi-1", flops=2.5e10, int8_ops=8e10, memory_bytes=4 << 30,
                         runtimes=["onnx", "onnx-int8"], cores=4, speed=0.5,
                         platform="Linux-aarch64")


# --- round trips ---------------------------------------------------------------------------

COMMANDS = [Ping(seq=7), Deploy(manifest=manifest()), Teardown(deployment="d1")]
EVENTS = [
    Pong(seq=7),
    Deployed(deployment="d1", generation=2, shards=["s0"], load_s=0.25),
    TornDown(deployment="d1"),
    ErrorEvent(reason="bad_artifact", detail="sha256 mismatch", deployment="d1"),
    ErrorEvent(reason="malformed", detail="not JSON"),
    Telemetry(requests=10, rss_bytes=1 << 27, cpu_percent=12.5,
              shards={"s0": ShardStats(runs=10, compute_s=0.5, bytes_in=40, bytes_out=80)}),
]


@pytest.mark.parametrize("message", COMMANDS, ids=lambda m: m.kind)
def test_every_command_round_trips(message: Model) -> None:
    raw = seal(KEY, CMD, "coordinator", message, now=NOW)
    sender, back = unseal(KEY, CMD, raw, NOW + 1.0, ReplayGuard(), COMMAND)
    assert sender == "coordinator"
    assert back == message and type(back) is type(message)


@pytest.mark.parametrize("message", EVENTS, ids=lambda m: f"{m.kind}")
def test_every_event_round_trips(message: Model) -> None:
    topic = topics.events("lab", "pi-1")
    raw = seal(KEY, topic, "pi-1", message, now=NOW)
    sender, back = unseal(KEY, topic, raw, NOW, ReplayGuard(), EVENT)
    assert (sender, back) == ("pi-1", message)


def test_state_and_heartbeat_round_trip() -> None:
    state = DeviceState(status="online", device=profile(), agent_version="0.1.0",
                        data_host="127.0.0.1", data_port=29600, metrics_port=9100,
                        heartbeat_s=0.5, deployments=["d1"])
    topic = topics.state("lab", "pi-1")
    raw = seal(KEY, topic, "pi-1", state, now=NOW)
    # retained state is read long after it was published: no age limit, no replay guard
    assert unseal(KEY, topic, raw, NOW + 86_400, None, DeviceState, max_age_s=None) \
        == ("pi-1", state)
    beat = Heartbeat(seq=3, deployments=["d1"])
    topic = topics.heartbeat("lab", "pi-1")
    raw = seal(KEY, topic, "pi-1", beat, now=NOW)
    assert unseal(KEY, topic, raw, NOW, ReplayGuard(), Heartbeat) == ("pi-1", beat)


def test_envelope_is_the_documented_json() -> None:
    raw = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW, nonce=NONCE)
    data = json.loads(raw)
    assert set(data) == {"v", "sender", "topic", "ts", "nonce", "body", "sig"}
    assert data["body"] == {"kind": "ping", "seq": 7}
    assert json.loads(sign_by_hand(KEY, data))["sig"] == data["sig"]   # same rule, rewritten
    fresh = json.loads(seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW))
    assert len(fresh["nonce"]) == 32 and fresh["nonce"] != NONCE


def test_hand_signed_message_is_accepted() -> None:
    raw = sign_by_hand(KEY, envelope({"kind": "ping", "seq": 1}, ts=int(NOW)))
    assert unseal(KEY, CMD, raw, NOW, None, COMMAND) == ("coordinator", Ping(seq=1))


def test_profile_is_a_placement_device() -> None:
    device = profile().to_device()
    assert (device.id, device.flops, device.memory_bytes, device.runtimes) == \
        ("pi-1", 2.5e10, 4 << 30, ("onnx", "onnx-int8"))


# --- every rejection, from real bytes ------------------------------------------------------

def test_tampered_body_is_rejected() -> None:
    raw = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW)
    assert b'"seq":7' in raw
    rejected("bad_signature", unseal, KEY, CMD, raw.replace(b'"seq":7', b'"seq":8'), NOW,
             None, COMMAND)


def test_tampered_topic_is_rejected() -> None:
    other = topics.cmd("lab", "pi-2")
    raw = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW)
    # rewriting the signed topic breaks the signature ...
    rejected("bad_signature", unseal, KEY, other, raw.replace(CMD.encode(), other.encode()),
             NOW, None, COMMAND)
    # ... and the untouched message is refused on another device's topic
    error = rejected("wrong_topic", unseal, KEY, other, raw, NOW, None, COMMAND)
    assert "pi-1" in str(error) and "pi-2" in str(error)


def test_wrong_key_is_rejected() -> None:
    raw = seal(OTHER_KEY, CMD, "coordinator", Ping(seq=7), now=NOW)
    rejected("bad_signature", unseal, KEY, CMD, raw, NOW, None, COMMAND)


@pytest.mark.parametrize("sig", [None, ""])
def test_missing_signature_is_rejected(sig: str | None) -> None:
    data = json.loads(seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW))
    if sig is None:
        del data["sig"]
    else:
        data["sig"] = sig
    rejected("unsigned", unseal, KEY, CMD, json.dumps(data).encode(), NOW, None, COMMAND)


@pytest.mark.parametrize("sig", ["00" * 32, "zz", 12345, "é" * 64])
def test_garbage_signature_is_rejected(sig: Any) -> None:
    data = json.loads(seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW))
    data["sig"] = sig
    rejected("bad_signature", unseal, KEY, CMD, json.dumps(data).encode(), NOW, None, COMMAND)


@pytest.mark.parametrize("skew", [-30.5, 30.5, -3600.0, 3600.0])
def test_stale_timestamp_is_rejected_in_both_directions(skew: float) -> None:
    raw = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW)
    error = rejected("stale", unseal, KEY, CMD, raw, NOW + skew, None, COMMAND)
    assert ("old" if skew > 0 else "future") in str(error)


def test_timestamp_at_the_limit_is_accepted_and_none_disables_it() -> None:
    raw = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW)
    for now in (NOW - 30.0, NOW + 30.0):
        assert unseal(KEY, CMD, raw, now, None, COMMAND)[1] == Ping(seq=7)
    rejected("stale", unseal, KEY, CMD, raw, NOW + 10.0, None, COMMAND, max_age_s=5.0)
    assert unseal(KEY, CMD, raw, NOW + 1e6, None, COMMAND, max_age_s=None)[1] == Ping(seq=7)


def test_replayed_nonce_is_rejected() -> None:
    guard = ReplayGuard()
    raw = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW)
    unseal(KEY, CMD, raw, NOW, guard, COMMAND)
    rejected("replayed", unseal, KEY, CMD, raw, NOW + 1.0, guard, COMMAND)
    # same nonce under a new timestamp (re-signed by a key holder) is still a replay
    again = seal(KEY, CMD, "coordinator", Ping(seq=7), now=NOW + 2.0,
                 nonce=json.loads(raw)["nonce"])
    rejected("replayed", unseal, KEY, CMD, again, NOW + 2.0, guard, COMMAND)
    # a fresh message is fine; without a guard nothing is remembered
    unseal(KEY, CMD, seal(KEY, CMD, "coordinator", Ping(seq=8), now=NOW), NOW, guard, COMMAND)
    unseal(KEY, CMD, raw, NOW, None, COMMAND)
    unseal(KEY, CMD, raw, NOW, None, COMMAND)


def test_oversized_is_rejected_before_parsing() -> None:
    rejected("oversized", unseal, KEY, CMD, b"{" * (MAX_MESSAGE_BYTES + 1), NOW, None, COMMAND)
    big = sign_by_hand(KEY, envelope({"kind": "ping", "seq": 1, "pad": "x" * MAX_MESSAGE_BYTES}))
    rejected("oversized", unseal, KEY, CMD, big, NOW, None, COMMAND)


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"\xff\xfe{}", b"[1, 2]", b'"ping"', b"{" * 100_000,
    b'{"v": 1, "v": 1}', b'{"v": NaN}',
], ids=["empty", "text", "not-utf8", "array", "string", "deep", "duplicate-key", "nan"])
def test_non_json_is_rejected(raw: bytes) -> None:
    rejected("malformed", unseal, KEY, CMD, raw, NOW, None, COMMAND)


@pytest.mark.parametrize("change", [
    {"v": 2}, {"nonce": "short"}, {"nonce": "G" * 32}, {"ts": "now"}, {"ts": True},
    {"sender": "a/b"}, {"sender": "+"}, {"body": [1]}, {"extra": 1},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bad_envelope_is_malformed_even_when_signed(change: dict[str, Any]) -> None:
    data = {**envelope({"kind": "ping", "seq": 1}), **change}
    rejected("malformed", unseal, KEY, CMD, sign_by_hand(KEY, data), NOW, None, COMMAND)
    missing = envelope({"kind": "ping", "seq": 1})
    del missing["nonce"]
    rejected("malformed", unseal, KEY, CMD, sign_by_hand(KEY, missing), NOW, None, COMMAND)


class Reboot(Model):
    kind: Literal["reboot"] = "reboot"


class PingPlus(Model):
    kind: Literal["ping"] = "ping"
    seq: int
    shell: str


@pytest.mark.parametrize("body", [Reboot(), PingPlus(seq=1, shell="rm -rf /")],
                         ids=["unknown-kind", "extra-field"])
def test_unknown_kind_and_extra_field_are_schema_errors(body: Model) -> None:
    raw = seal(KEY, CMD, "coordinator", body, now=NOW)
    error = rejected("schema", unseal, KEY, CMD, raw, NOW, None, COMMAND)
    assert ("reboot" in str(error)) if isinstance(body, Reboot) else ("shell" in str(error))


@pytest.mark.parametrize("body", [
    {"kind": "ping", "seq": "7"}, {"kind": "ping", "seq": -1}, {"kind": "ping"},
    {"seq": 1}, {"kind": "teardown", "deployment": 5},
])
def test_wrong_types_are_schema_errors(body: dict[str, Any]) -> None:
    rejected("schema", unseal, KEY, CMD, sign_by_hand(KEY, envelope(body)), NOW, None, COMMAND)
    rejected("schema", parse_command, body)


def test_checks_run_in_the_documented_order() -> None:
    # a forged message learns nothing about freshness or topic: the signature comes first
    forged = seal(OTHER_KEY, CMD, "coordinator", Reboot(), now=NOW - 1e6)
    rejected("bad_signature", unseal, KEY, "elsewhere", forged, NOW, None, COMMAND)
    unsigned = envelope({"kind": "reboot"}, ts=NOW - 1e6)
    rejected("unsigned", unseal, KEY, "elsewhere", json.dumps(unsigned).encode(), NOW, None,
             COMMAND)
    # a replayed stale message is stale; a replayed badly typed one is replayed
    guard = ReplayGuard()
    raw = seal(KEY, CMD, "coordinator", Reboot(), now=NOW)
    rejected("schema", unseal, KEY, CMD, raw, NOW, guard, COMMAND)
    rejected("replayed", unseal, KEY, CMD, raw, NOW, guard, COMMAND)
    rejected("stale", unseal, KEY, CMD, raw, NOW + 31, guard, COMMAND)


def test_seal_refuses_what_peers_would_reject() -> None:
    with pytest.raises(InvalidInput, match="sender"):
        seal(KEY, CMD, "a/b", Ping(seq=1), now=NOW)
    with pytest.raises(InvalidInput, match="nonce"):
        seal(KEY, CMD, "coordinator", Ping(seq=1), now=NOW, nonce="XYZ")
    with pytest.raises(InvalidInput, match="finite"):
        seal(KEY, CMD, "coordinator", ErrorEvent(reason="x", detail="y"), now=float("nan"))
    with pytest.raises(InvalidInput, match="not plain JSON"):
        seal(KEY, CMD, "pi-1", Telemetry(requests=0, shards={}, rss_bytes=0,
                                         cpu_percent=float("inf")), now=NOW)
    with pytest.raises(InvalidInput, match="bytes"):
        seal(KEY, CMD, "pi-1", ErrorEvent(reason="x", detail="y" * MAX_MESSAGE_BYTES), now=NOW)


def test_parse_command_and_event_take_dicts_and_json() -> None:
    assert parse_command({"kind": "ping", "seq": 3}) == Ping(seq=3)
    assert parse_command(b'{"kind": "teardown", "deployment": "d1"}') == Teardown(deployment="d1")
    assert parse_event('{"kind": "pong", "seq": 3}') == Pong(seq=3)
    rejected("schema", parse_event, {"kind": "ping", "seq": 3})
    rejected("malformed", parse_command, b"{")


def test_messages_are_frozen_and_strict() -> None:
    ping = Ping(seq=1)
    with pytest.raises(ValueError, match="frozen"):
        ping.seq = 2
    with pytest.raises(ValueError):
        Ping(seq="1")


# --- the replay guard ----------------------------------------------------------------------

def nonce(i: int) -> str:
    return f"{i:032x}"


def test_guard_forgets_after_the_window_but_still_refuses_old_messages() -> None:
    guard = ReplayGuard(window_s=60.0)
    guard.check(nonce(1), ts=100.0, now=100.0)
    rejected("replayed", guard.check, nonce(1), 100.0, 159.0)
    assert len(guard) == 1
    # past the window the nonce is forgotten ...
    guard.check(nonce(2), ts=161.0, now=161.0)
    assert len(guard) == 1
    # ... and a message that old is refused as stale, so forgetting is safe
    rejected("stale", guard.check, nonce(1), 100.0, 161.0)
    rejected("stale", guard.check, nonce(3), 300.0, 161.0)   # too far in the future too


def test_guard_memory_is_bounded_and_fails_closed() -> None:
    guard = ReplayGuard(window_s=60.0, capacity=3)
    for i in range(10):
        guard.check(nonce(i), ts=100.0 + i, now=110.0)
        assert len(guard) <= 3
    assert len(guard) == 3
    # the forgotten nonces (ts 100..106) are refused, not accepted again
    for i in range(7):
        rejected("replayed", guard.check, nonce(i), 100.0 + i, 110.0)
    # remembered ones are refused as replays; newer fresh ones are accepted
    rejected("replayed", guard.check, nonce(9), 109.0, 110.0)
    guard.check(nonce(50), ts=109.5, now=110.0)
    # an unseen nonce older than the oldest remembered one cannot be vouched for
    rejected("replayed", guard.check, nonce(51), 107.5, 110.0)
    assert len(guard) == 3


def test_guard_keeps_working_under_a_long_stream() -> None:
    guard = ReplayGuard(window_s=1.0, capacity=1000)
    for i in range(20_000):
        t = i * 0.01
        guard.check(nonce(i), ts=t, now=t)
    assert len(guard) <= 101   # one second of messages at 100 per second


def test_guard_arguments_are_checked() -> None:
    with pytest.raises(InvalidInput):
        ReplayGuard(window_s=0)
    with pytest.raises(InvalidInput):
        ReplayGuard(capacity=0)
