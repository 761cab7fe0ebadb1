"""The deploy manifest: wiring checks that name the wrong field, and the file signature."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from edgeswarm.device_agent.manifest import (
    Manifest,
    read_signed,
    sign_manifest,
    verify_manifest,
    write_signed,
)
from edgeswarm.device_agent.protocol import Rejected
from edgeswarm.placement.errors import InvalidInput

KEY = b"k" * 32


def artifact(name: str = "s.onnx") -> dict[str, Any]:
    return {"name": name, "sha256": "0f" * 32, "size": 100, "url": "http://127.0.0.1:1/x"}


def data() -> dict[str, Any]:
    """A three-rank pipeline coordinator -> a -> b -> coordinator, with a TP pair on b."""
    return {
        "format": "edgeswarm.manifest/1", "deployment": "d1", "generation": 3, "model": "mlp",
        "store_host": "127.0.0.1", "store_port": 29500, "world_size": 3,
        "ranks": {"coordinator": 0, "a": 1, "b": 2},
        "shards": [
            {"id": "s0", "device": "a", "runtime": "onnx", "artifact": artifact(),
             "recv_from": [0], "send_to": [2]},
            {"id": "s1", "device": "b", "runtime": "safetensors", "builder": "linear",
             "params": {"relu": True, "dims": [4, 8]}, "artifact": artifact("w.safetensors"),
             "recv_from": [1], "send_to": [0], "tp_group": [2]},
        ],
        "links": {"a->b": {"bandwidth_Bps": 1e6, "latency_s": 0.01}},
    }


def sign_by_hand(key: bytes, doc: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return {**doc, "signature": hmac.new(key, text.encode(), hashlib.sha256).hexdigest()}


def test_valid_manifest_and_its_lookups() -> None:
    m = Manifest.model_validate(data())
    assert [s.id for s in m.shards_of("b")] == ["s1"]
    assert m.shards_of("coordinator") == []
    assert (m.rank_of("coordinator"), m.rank_of("a"), m.rank_of("b")) == (0, 1, 2)
    assert m.timeout_s == 10.0 and m.links["a->b"].latency_s == 0.01
    with pytest.raises(InvalidInput, match="'c' is not in deployment 'd1'"):
        m.rank_of("c")


def mutate(path: str, value: Any) -> dict[str, Any]:
    """A copy of data() with the field at ``a.b.0.c`` set (or deleted when value is ...)."""
    doc = copy.deepcopy(data())
    *parents, last = path.split(".")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if value is ...:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


BAD = [
    ("ranks.b", 1, "ranks['b']"),                         # two devices on rank 1
    ("ranks.b", 3, "ranks['b']"),                         # outside [0, world_size)
    ("ranks.coordinator", 2, "ranks"),                    # coordinator must be 0
    ("world_size", 4, "ranks"),                           # a rank without a device
    ("shards.0.device", "c", "shards[0].device"),
    ("shards.0.recv_from", [0, 5], "shards[0].recv_from"),
    ("shards.1.send_to", [-1], "shards[1].send_to"),
    ("shards.1.tp_group", [2, 3], "shards[1].tp_group"),
    ("shards.1.id", "s0", "shards[1].id"),
    ("shards.1.builder", None, "shards[1].builder"),
    ("shards.0.runtime", "tensorrt", "shards[0].runtime"),
    ("shards.0.artifact.sha256", "0F" * 32, "shards[0].artifact.sha256"),
    ("shards.0.artifact.sha256", "0f" * 31, "shards[0].artifact.sha256"),
    ("shards.0.artifact.url", "ftp://host/x", "shards[0].artifact.url"),
    ("shards.0.artifact.name", "../etc/passwd", "shards[0].artifact.name"),
    ("shards.0.artifact.size", -1, "shards[0].artifact.size"),
    ("shards.0.artifact.extra", 1, "shards[0].artifact.extra"),
    ("links.a=>b", {"bandwidth_Bps": 1.0, "latency_s": 0.0}, "links['a=>b']"),
    ("links.a->z", {"bandwidth_Bps": 1.0, "latency_s": 0.0}, "links['a->z']"),
    ("format", "edgeswarm.manifest/2", "format"),
    ("generation", -1, "generation"),
    ("store_port", "29500", "store_port"),
    ("deployment", "a/b", "deployment"),
    ("model", ..., "model"),
    ("signed_by", "me", "signed_by"),
]


@pytest.mark.parametrize(("path", "value", "named"), BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_validation_errors_name_the_field(path: str, value: Any, named: str) -> None:
    doc = mutate(path, value)
    with pytest.raises(ValidationError) as info:
        Manifest.model_validate(doc)
    pydantic_style = re.sub(r"\[(\d+)\]", r".\1", named)   # shards[0].x -> shards.0.x
    assert named in str(info.value) or pydantic_style in str(info.value)
    with pytest.raises(Rejected) as rejected:
        verify_manifest(KEY, sign_by_hand(KEY, doc))
    assert rejected.value.reason == "schema"
    assert named in str(rejected.value)


def test_signature_is_the_documented_hmac() -> None:
    m = Manifest.model_validate(data())
    signed = sign_manifest(KEY, m)
    assert signed == sign_by_hand(KEY, m.model_dump(mode="json"))
    assert verify_manifest(KEY, signed) == m
    assert verify_manifest(KEY, json.loads(json.dumps(signed))) == m   # survives JSON


@pytest.mark.parametrize(("path", "value"), [
    ("generation", 4), ("shards.0.artifact.sha256", "1f" * 32), ("ranks.a", 2),
    ("shards.1.params.relu", False), ("links.a->b.latency_s", 0.0),
])
def test_any_change_after_signing_is_rejected(path: str, value: Any) -> None:
    signed = sign_manifest(KEY, Manifest.model_validate(data()))
    tampered = copy.deepcopy(signed)
    *parents, last = path.split(".")
    node: Any = tampered
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    assert tampered != signed
    with pytest.raises(Rejected) as info:
        verify_manifest(KEY, tampered)
    assert info.value.reason == "bad_signature"


def test_wrong_key_missing_signature_and_non_json() -> None:
    signed = sign_manifest(KEY, Manifest.model_validate(data()))
    for doc, reason in [
        (signed, "bad_signature"),                                     # under another key
        ({k: v for k, v in signed.items() if k != "signature"}, "unsigned"),
        ({**signed, "signature": 7}, "bad_signature"),
        ({**signed, "model": float("nan")}, "malformed"),
    ]:
        with pytest.raises(Rejected) as info:
            verify_manifest(b"x" * 32 if reason == "bad_signature" and doc is signed else KEY,
                            doc)
        assert info.value.reason == reason, str(info.value)
    with pytest.raises(Rejected, match="malformed"):
        verify_manifest(KEY, [1, 2])


def test_manifest_file_round_trip_and_tamper(tmp_path: Path) -> None:
    m = Manifest.model_validate(data())
    path = write_signed(tmp_path / "m.json", KEY, m)
    assert read_signed(path, KEY) == m
    path.write_text(path.read_text().replace('"generation": 3', '"generation": 9'))
    with pytest.raises(Rejected, match="bad_signature"):
        read_signed(path, KEY)
    path.write_text("{")
    with pytest.raises(Rejected, match="malformed"):
        read_signed(path, KEY)
    with pytest.raises(InvalidInput, match="cannot read manifest"):
        read_signed(tmp_path / "missing.json", KEY)
