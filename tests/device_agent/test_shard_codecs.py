"""Codecs on a shard's network edges: encoded before a send, decoded after a receive, over
a real gloo data plane (ranks as threads); bad codec lists and payloads refused by name."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import artifact
from _support import together as _together
from pydantic import ValidationError
from safetensors.numpy import save_file

from edgeswarm.device_agent.dataplane import DataPlane, StoreHost
from edgeswarm.device_agent.executor import BUILDERS, ShardExecutor, open_plane, register_builder
from edgeswarm.device_agent.manifest import CodecRef, Manifest, Shard
from edgeswarm.device_agent.shard_codecs import ShardCodecs, artifacts, file_key
from edgeswarm.models import codecs
from edgeswarm.placement.errors import InvalidInput, ProtocolError

TIMEOUT_S = 30.0
INT8 = CodecRef(name="int8")
NONE = CodecRef(name="none")



def together(*fns: Callable[[], Any]) -> list[Any]:
    return _together(*fns, deadline_s=TIMEOUT_S)



def scale(weights: dict[str, np.ndarray], params: dict[str, Any]
          ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Multiplies every input by the stored factor (and returns them all)."""
    factor = weights["factor"]
    return lambda inputs: [x * factor for x in inputs]


@pytest.fixture(autouse=True)
def builder() -> Iterator[None]:
    register_builder("codec-test-scale", scale)
    yield
    BUILDERS.pop("codec-test-scale", None)


@pytest.fixture
def store() -> Iterator[StoreHost]:
    with StoreHost() as host:
        yield host


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "scale.safetensors"
    save_file({"factor": np.array(2.0, dtype=np.float32)}, str(path))
    return path


def shard(sid: str, device: str, path: Path, recv_from: list[int], send_to: list[int],
          **codecs_: Any) -> Shard:
    return Shard(id=sid, device=device, runtime="safetensors", artifact=artifact(path),
                 recv_from=recv_from, send_to=send_to, builder="codec-test-scale", **codecs_)


def manifest(port: int, devices: list[str], shards: list[Shard]) -> Manifest:
    ranks = {"coordinator": 0} | {d: i + 1 for i, d in enumerate(devices)}
    return Manifest(deployment="d1", generation=1, model="m", store_host="127.0.0.1",
                    store_port=port, world_size=len(ranks), ranks=ranks, shards=shards,
                    timeout_s=TIMEOUT_S)


def join(m: Manifest, devices: list[str]) -> list[DataPlane]:
    return together(lambda: open_plane(m, "coordinator"),
                    *[lambda d=d: open_plane(m, d) for d in devices])


def test_a_coded_edge_carries_the_payload_and_the_receiver_gets_the_values_back(
        store: StoreHost, weights: Path) -> None:
    """coordinator -> a (x2, int8 out) -> b (int8 in, x2) -> coordinator"""
    m = manifest(store.port, ["a", "b"], [
        shard("sa", "a", weights, [0], [2], send_codecs=[INT8]),
        shard("sb", "b", weights, [1], [0], recv_codecs=[INT8])])
    coord, pa, pb = join(m, ["a", "b"])
    ea = ShardExecutor(m, "a", {"sa": weights}, pa)
    eb = ShardExecutor(m, "b", {"sb": weights}, pb)
    x = np.random.default_rng(0).standard_normal((2, 8, 16, 16)).astype(np.float32)
    try:
        def coordinator() -> list[np.ndarray]:
            coord.send([x], 1, 7)
            return coord.recv(2)[1]

        (y,) = together(ea.run_once, eb.run_once, coordinator)[2]
        int8 = codecs.get("int8")
        np.testing.assert_array_equal(y, int8.decode(int8.encode(2 * x)) * 2)
        step = float((2 * x).max() - (2 * x).min()) / 255
        assert np.abs(y - 4 * x).max() <= 2 * step / 2 + 1e-5   # int8's bound, doubled by b
        sent = ea.stats["sa"].bytes_out
        assert sent < x.nbytes / 3                             # the payload, not fp32
        assert eb.stats["sb"].bytes_in == sent
    finally:
        for p in (coord, pa, pb):
            p.close()


def test_a_hand_off_on_one_device_is_never_coded(store: StoreHost, weights: Path) -> None:
    m = manifest(store.port, ["pi"], [
        shard("s1", "pi", weights, [0], [1], send_codecs=[INT8]),
        shard("s2", "pi", weights, [1], [0], recv_codecs=[INT8])])
    coord, plane = join(m, ["pi"])
    ex = ShardExecutor(m, "pi", {"s1": weights, "s2": weights}, plane)
    x = np.random.default_rng(1).standard_normal((1, 5)).astype(np.float32)
    try:
        def coordinator() -> list[np.ndarray]:
            coord.send([x], 1, 1)
            return coord.recv(1)[1]

        (y,) = together(ex.run_once, coordinator)[1]
        np.testing.assert_array_equal(y, 4 * x)   # exact: nothing was quantized
    finally:
        coord.close()
        plane.close()


def test_codec_lists_are_checked_against_what_travels(weights: Path) -> None:
    coded = ShardCodecs.load(shard("s", "d", weights, [0], [0], send_codecs=[INT8, NONE],
                                   recv_codecs=[NONE, INT8]), {})
    a, b = np.ones((1, 4), np.float32), np.arange(4, dtype=np.float32)[None]
    wired = coded.encode([a, b])
    assert wired[0].dtype == np.uint8 and wired[1] is b    # 'none' travels as it is
    back = coded.decode(wired[1:], 0) + coded.decode(wired[:1], 1)
    assert back[0] is b and np.array_equal(back[1], a)
    with pytest.raises(ProtocolError, match="has 1 outputs but its send_codecs names 2"):
        coded.encode([a])
    with pytest.raises(ProtocolError, match=r"input 1 should be a 'int8' payload .* float32"):
        coded.decode([b, a], 0)
    with pytest.raises(ProtocolError, match="at least 3 inputs"):
        coded.decode([b, wired[0], a], 0)
    corrupt = wired[0][:-3].copy()
    with pytest.raises(InvalidInput, match="shard 's', input 1: codec 'int8': cannot decode"):
        coded.decode([corrupt], 1)
    plain = ShardCodecs.load(shard("p", "d", weights, [0], [0]), {})
    assert plain.send is None and plain.encode([a])[0] is a and plain.decode([a], 0)[0] is a


def test_unknown_or_unfetched_codecs_are_refused_naming_the_shard(weights: Path) -> None:
    with pytest.raises(InvalidInput, match="shard 's' output 0: unknown codec 'zip'"):
        ShardCodecs.load(shard("s", "d", weights, [0], [0],
                               send_codecs=[CodecRef(name="zip")]), {})
    with pytest.raises(InvalidInput, match="'png' codes input images"):
        ShardCodecs.load(shard("s", "d", weights, [0], [0],
                               recv_codecs=[CodecRef(name="png")]), {})
    ref = CodecRef(name="learned:1e-05", artifacts=[artifact(weights)])
    with pytest.raises(InvalidInput, match=r"codec artifact 'scale\.safetensors' was not fetched"):
        ShardCodecs.load(shard("s", "d", weights, [0], [0], recv_codecs=[ref]), {})
    with pytest.raises(InvalidInput, match="needs its two artifact files"):
        ShardCodecs.load(shard("s", "d", weights, [0], [0], recv_codecs=[ref]),
                         {file_key(ref.artifacts[0]): weights})
    with pytest.raises(InvalidInput, match="codec 'none' takes no artifacts"):
        ShardCodecs.load(shard("s", "d", weights, [0], [0], recv_codecs=[
            CodecRef(name="none", artifacts=[artifact(weights)])]), {})
    with pytest.raises(ValidationError, match="name"):
        CodecRef(name="INT8 --force")
    twice = [shard("a", "d", weights, [0], [0], send_codecs=[ref]),
             shard("b", "d", weights, [0], [0], recv_codecs=[ref])]
    assert [a.sha256 for a in artifacts(twice)] == [ref.artifacts[0].sha256]
