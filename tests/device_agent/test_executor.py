"""The shard executor over a real gloo data plane.

The ONNX pipeline runs each stage in its own process, as devices would; the other cases
run ranks as threads of the test process (each with its own process group and sockets).
"""

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _support import artifact
from _support import together as _together
from safetensors.numpy import save_file

from edgeswarm.device_agent import wire
from edgeswarm.device_agent.dataplane import DataPlane, StoreHost
from edgeswarm.device_agent.executor import (
    BUILDERS,
    ShardExecutor,
    open_plane,
    register_builder,
    shaping,
)
from edgeswarm.device_agent.manifest import Artifact, LinkShape, Manifest, Shard
from edgeswarm.placement.errors import DeviceLost, InvalidInput, ModelFileError, ProtocolError

#: Generous: joining can stall 5 s where reverse DNS drops a query (see test_dataplane);
#: no case here waits for a timeout to run out.
TIMEOUT_S = 30.0



def together(*fns: Callable[[], Any], deadline_s: float = 30.0) -> list[Any]:
    return _together(*fns, deadline_s=deadline_s)



def make_manifest(port: int, devices: list[str], shards: list[Shard], **extra: Any) -> Manifest:
    ranks = {"coordinator": 0} | {d: i + 1 for i, d in enumerate(devices)}
    return Manifest(deployment="d1", generation=1, model="mlp", store_host="127.0.0.1",
                    store_port=port, world_size=len(ranks), ranks=ranks, shards=shards,
                    timeout_s=extra.pop("timeout_s", TIMEOUT_S), **extra)


def linear(weights: dict[str, np.ndarray], params: dict[str, Any]
           ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A plain numpy linear layer: y = x W^T (+ b), optionally ReLU."""
    w, b = weights["weight"], weights.get("bias")

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        y = inputs[0] @ w.T + (b if b is not None else 0)
        return [np.maximum(y, 0) if params.get("relu") else y]

    return run


@pytest.fixture(autouse=True)
def builders() -> Iterator[None]:
    register_builder("test-linear", linear)
    yield
    BUILDERS.pop("test-linear", None)


@pytest.fixture
def store() -> Iterator[StoreHost]:
    with StoreHost() as host:
        yield host


def weights_file(tmp_path: Path, name: str, weight: np.ndarray,
                 bias: np.ndarray | None = None) -> Path:
    path = tmp_path / f"{name}.safetensors"
    tensors = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    save_file(tensors, str(path))
    return path


def linear_shard(sid: str, device: str, path: Path, recv_from: list[int], send_to: list[int],
                 **extra: Any) -> Shard:
    return Shard(id=sid, device=device, runtime="safetensors", artifact=artifact(path),
                 recv_from=recv_from, send_to=send_to, builder="test-linear", **extra)


def join(manifest: Manifest, devices: list[str]) -> list[DataPlane]:
    """The coordinator's plane and each device's, joined concurrently."""
    return together(lambda: open_plane(manifest, "coordinator"),
                    *[lambda d=d: open_plane(manifest, d) for d in devices])


# -- in one process ------------------------------------------------------------------------

def test_a_safetensors_shard_runs_through_its_builder(store: StoreHost, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((4, 6)).astype(np.float32), np.arange(4, dtype=np.float32)
    path = weights_file(tmp_path, "lin", w, b)
    m = make_manifest(store.port, ["pi"], [linear_shard("lin", "pi", path, [0], [0])])
    coord, plane = join(m, ["pi"])
    ex = ShardExecutor(m, "pi", {"lin": path}, plane)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    try:
        def coordinator() -> tuple[int, list[np.ndarray]]:
            coord.send([x], 1, 5)
            return coord.recv(1)

        served, (rid, (y,)) = together(ex.run_once, coordinator)
        assert served and rid == 5
        np.testing.assert_array_equal(y, x @ w.T + b)
        stats = ex.stats["lin"]
        assert stats.runs == 1 and stats.compute_s > 0
        assert stats.bytes_in == coord.bytes_sent and stats.bytes_out == coord.bytes_received
        assert ex.requests == 1
    finally:
        coord.close()
        plane.close()


def test_two_shards_on_one_device_hand_off_locally(store: StoreHost, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((5, 3)), rng.standard_normal((2, 5))
    p1 = weights_file(tmp_path, "a", w1.astype(np.float32))
    p2 = weights_file(tmp_path, "b", w2.astype(np.float32))
    m = make_manifest(store.port, ["pi"], [
        linear_shard("a", "pi", p1, [0], [1], params={"relu": True}),
        linear_shard("b", "pi", p2, [1], [0])])
    coord, plane = join(m, ["pi"])
    ex = ShardExecutor(m, "pi", {"a": p1, "b": p2}, plane)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    try:
        def coordinator() -> list[np.ndarray]:
            coord.send([x], 1, 0)
            return coord.recv(1)[1]

        (y,) = together(ex.run_once, coordinator)[1]
        w1f, w2f = w1.astype(np.float32), w2.astype(np.float32)
        np.testing.assert_array_equal(y, np.maximum(x @ w1f.T, 0) @ w2f.T)
        stats = ex.stats
        assert stats["a"].bytes_out == 0 and stats["b"].bytes_in == 0  # never on the network
        assert stats["a"].runs == stats["b"].runs == 1
    finally:
        coord.close()
        plane.close()


def test_a_tensor_parallel_group_sums_its_partial_results(store: StoreHost,
                                                          tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3, 8)).astype(np.float32)
    # row-parallel: each half of the input features, the partial products summed
    halves = [np.zeros_like(w), np.zeros_like(w)]
    halves[0][:, :4], halves[1][:, 4:] = w[:, :4], w[:, 4:]
    paths = [weights_file(tmp_path, f"h{i}", h) for i, h in enumerate(halves)]
    shards = [linear_shard(f"h{i}", f"dev{i}", paths[i], [0], [0], tp_group=[1, 2])
              for i in range(2)]
    m = make_manifest(store.port, ["dev0", "dev1"], shards)
    coord, p1, p2 = join(m, ["dev0", "dev1"])
    e1 = ShardExecutor(m, "dev0", {"h0": paths[0]}, p1)
    e2 = ShardExecutor(m, "dev1", {"h1": paths[1]}, p2)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    try:
        def coordinator() -> list[np.ndarray]:
            coord.send([x], 1, 3)
            coord.send([x], 2, 3)
            return [coord.recv(1)[1][0], coord.recv(2)[1][0]]

        y1, y2 = together(e1.run_once, e2.run_once, coordinator)[2]
        np.testing.assert_allclose(y1, x @ w.T, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(y1, y2)
    finally:
        for p in (coord, p1, p2):
            p.close()


def test_speed_below_one_stretches_compute_time(store: StoreHost, tmp_path: Path) -> None:
    path = weights_file(tmp_path, "lin", np.eye(3, dtype=np.float32))
    m = make_manifest(store.port, ["pi"], [linear_shard("lin", "pi", path, [0], [0])])
    coord, plane = join(m, ["pi"])
    ticks = iter(np.arange(0.0, 100.0, 0.01))  # a clock that moves 10 ms per reading
    slept: list[float] = []
    ex = {speed: ShardExecutor(m, "pi", {"lin": path}, plane, speed=speed,
                               clock=lambda: float(next(ticks)), sleep=slept.append)
          for speed in (1.0, 0.25)}
    try:
        for speed in (1.0, 0.25):
            def coordinator() -> None:
                coord.send([np.ones((1, 3), np.float32)], 1, 0)
                coord.recv(1)

            together(ex[speed].run_once, coordinator)
        assert ex[1.0].stats["lin"].compute_s == pytest.approx(0.01)
        assert slept == [pytest.approx(0.03)]  # 10 ms of work at a quarter speed: 30 ms more
        assert ex[0.25].stats["lin"].compute_s == pytest.approx(0.04)
    finally:
        coord.close()
        plane.close()


def test_out_of_step_inputs_are_a_protocol_error(store: StoreHost, tmp_path: Path) -> None:
    path = weights_file(tmp_path, "cat", np.ones((1, 4), np.float32))
    m = make_manifest(store.port, ["a", "b"], [
        linear_shard("cat", "b", path, [0, 1], [0])])  # takes one tensor from 0, one from 1
    coord, pa, pb = join(m, ["a", "b"])
    ex = ShardExecutor(m, "b", {"cat": path}, pb)
    try:
        with pytest.raises(ProtocolError, match="got request 8 from rank 1 while serving "
                                                "request 7"):
            together(ex.run_once, lambda: coord.send([np.ones(2, np.float32)], 2, 7),
                     lambda: pa.send([np.ones(2, np.float32)], 2, 8))
    finally:
        for p in (coord, pa, pb):
            p.close()


def test_serve_ends_with_device_lost_when_the_coordinator_leaves(store: StoreHost,
                                                                 tmp_path: Path) -> None:
    path = weights_file(tmp_path, "lin", np.eye(2, dtype=np.float32))
    m = make_manifest(store.port, ["pi"], [linear_shard("lin", "pi", path, [0], [0])])
    coord, plane = join(m, ["pi"])
    ex = ShardExecutor(m, "pi", {"lin": path}, plane)
    t = threading.Thread(target=ex.serve, args=(threading.Event(),))
    t.start()
    try:
        coord.send([np.ones((1, 2), np.float32)], 1, 0)
        coord.recv(1)
        coord.close()  # the executor is idle, waiting for the next request
        t.join(10)
        assert not t.is_alive()
        assert isinstance(ex.error, DeviceLost) and "rank 0" in str(ex.error)
        assert ex.requests == 1
    finally:
        coord.close()
        plane.close()


def test_bad_setups_are_refused(store: StoreHost, tmp_path: Path) -> None:
    path = weights_file(tmp_path, "lin", np.eye(2, dtype=np.float32))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    m = make_manifest(store.port, ["pi", "pc"], [linear_shard("lin", "pi", path, [0], [0])])
    coord, plane, other = join(m, ["pi", "pc"])
    try:
        with pytest.raises(InvalidInput, match="no artifact file for shard 'lin'"):
            ShardExecutor(m, "pi", {}, plane)
        with pytest.raises(ModelFileError, match="not a valid safetensors file"):
            ShardExecutor(m, "pi", {"lin": junk}, plane)
        with pytest.raises(InvalidInput, match="'pi' is rank 1"):
            ShardExecutor(m, "pi", {"lin": path}, other)
        with pytest.raises(InvalidInput, match="no shard on 'pc'"):
            ShardExecutor(m, "pc", {}, other)
        with pytest.raises(InvalidInput, match="speed"):
            ShardExecutor(m, "pi", {"lin": path}, plane, speed=0)
        unknown = m.model_copy(update={"shards": [
            m.shards[0].model_copy(update={"builder": "nope"})]})
        with pytest.raises(InvalidInput, match=r"builder 'nope'.*known: .*test-linear"):
            ShardExecutor(unknown, "pi", {"lin": path}, plane)
        with pytest.raises(InvalidInput, match="already registered"):
            register_builder("test-linear", lambda w, p: lambda xs: xs)
        dangling = m.model_copy(update={"shards": [
            m.shards[0].model_copy(update={"recv_from": [1]})]})
        with pytest.raises(InvalidInput, match="first input from this device"):
            ShardExecutor(dangling, "pi", {"lin": path}, plane)
    finally:
        for p in (coord, plane, other):
            p.close()


def test_manifest_links_become_shaping_of_the_sender() -> None:
    shard = Shard(id="s", device="pi", runtime="onnx", recv_from=[0], send_to=[0],
                  artifact=Artifact(name="s.onnx", sha256="0" * 64, size=1,
                                    url="file:///nonexistent"))
    m = make_manifest(1234, ["pi"], [shard], links={
        "coordinator->pi": LinkShape(bandwidth_Bps=1e6, latency_s=0.01),
        "pi->coordinator": LinkShape(bandwidth_Bps=2e6, latency_s=0.02)})
    out = shaping(m, "pi")
    assert list(out) == [0]
    assert out[0].latency_s == 0.02 and out[0].bandwidth_Bps == 2e6
    assert shaping(m, "coordinator")[1].bandwidth_Bps == 1e6


# -- across processes: a real two-stage ONNX pipeline ---------------------------------------

STAGE = r"""
import json, sys, threading
from pathlib import Path
from edgeswarm.device_agent.executor import ShardExecutor, open_plane
from edgeswarm.device_agent.manifest import Manifest
cfg = json.loads(sys.argv[1])
m = Manifest.model_validate_json(cfg["manifest"])
plane = open_plane(m, cfg["device"])
ex = ShardExecutor(m, cfg["device"], {k: Path(v) for k, v in cfg["files"].items()}, plane,
                   speed=cfg["speed"], threads=1)
ex.serve(threading.Event())
plane.close()
print(json.dumps({"requests": ex.requests, "error": str(ex.error) if ex.error else None,
                  "stats": {k: v.model_dump() for k, v in ex.stats.items()}}), flush=True)
"""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """A small MLP and its two halves exported to ONNX by edgeswarm's own compiler."""
    from edgeswarm.models.runtimes import compile

    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU())
    second = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                 torch.nn.Linear(16, 4))
    out = tmp_path_factory.mktemp("mlp")
    x = torch.randn(3, 8)
    a = compile(first, runtime="onnx", example_inputs=(x,), output=out / "stage1.onnx")
    b = compile(second, runtime="onnx", example_inputs=(first(x),), output=out / "stage2.onnx")
    assert a.path is not None and b.path is not None
    return torch.nn.Sequential(first, second).eval(), a.path, b.path


@pytest.mark.slow
def test_a_two_stage_onnx_pipeline_across_processes_matches_the_whole_model(
        store: StoreHost, mlp: tuple[torch.nn.Module, Path, Path]) -> None:
    from edgeswarm.models.runtimes import load

    model, path1, path2 = mlp
    shards = [Shard(id="s1", device="dev1", runtime="onnx", artifact=artifact(path1),
                    recv_from=[0], send_to=[2]),
              Shard(id="s2", device="dev2", runtime="onnx", artifact=artifact(path2),
                    recv_from=[1], send_to=[0])]
    m = make_manifest(store.port, ["dev1", "dev2"], shards, timeout_s=30.0)
    procs = [subprocess.Popen(
        [sys.executable, "-c", STAGE, json.dumps({
            "manifest": m.model_dump_json(), "device": dev, "files": {sid: str(path)},
            "speed": 1.0})], stdout=subprocess.PIPE, text=True)
        for dev, sid, path in (("dev1", "s1", path1), ("dev2", "s2", path2))]
    try:
        coord = open_plane(m, "coordinator")
        rng = np.random.default_rng(3)
        xs = [rng.standard_normal((n, 8)).astype(np.float32) for n in (1, 3, 5)]
        ys = []
        for i, x in enumerate(xs):
            coord.send([x], 1, i)
            rid, (y,) = coord.recv(2)
            assert rid == i
            ys.append(y)
        coord.send([], 1, wire.SHUTDOWN)
        assert coord.recv(2) == (wire.SHUTDOWN, [])  # it went through both stages
        reports = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
        assert [p.returncode for p in procs] == [0, 0]
        coord.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    s1, s2 = load(path1, threads=1), load(path2, threads=1)
    for x, y in zip(xs, ys, strict=True):
        np.testing.assert_array_equal(y, s2.run(s1.run([x]))[0])  # same runtime: exact
        with torch.no_grad():
            np.testing.assert_allclose(y, model(torch.from_numpy(x)).numpy(), rtol=1e-5,
                                       atol=1e-6)
    for report in reports:
        assert report["requests"] == 3 and report["error"] is None
    st1, st2 = reports[0]["stats"]["s1"], reports[1]["stats"]["s2"]
    assert st1["runs"] == st2["runs"] == 3
    assert st1["compute_s"] > 0 and st2["compute_s"] > 0
    assert st1["bytes_in"] == coord.bytes_sent  # the requests and the shutdown
    assert st1["bytes_out"] == st2["bytes_in"] - len(wire.encode([], wire.SHUTDOWN))
    assert st2["bytes_out"] + len(wire.encode([], wire.SHUTDOWN)) == coord.bytes_received
