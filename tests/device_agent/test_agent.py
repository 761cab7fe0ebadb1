"""The agent daemon: real agent processes (SIGTERM, kill -9), every kind of bad input sent
through a real broker and then counted on the metrics endpoint while the agent keeps
answering, a wrong artifact hash refused, and a 2-stage ONNX pipeline across two agents
with the coordinator as rank 0 that reproduces the unsplit model."""

import json
import queue
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from edgeswarm.bench.agent import agent_command
from edgeswarm.device_agent import keys, protocol, topics
from edgeswarm.device_agent import membership as ms
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.artifacts import ArtifactServer
from edgeswarm.device_agent.control import ControlClient
from edgeswarm.device_agent.coordinator import Coordinator, DeployFailed
from edgeswarm.device_agent.manifest import Artifact, Manifest, Shard
from edgeswarm.placement.errors import InvalidInput

KEY = bytes(range(32))
CLUSTER = "t"


def wait_until(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout_s} s")
        time.sleep(0.02)


def start_agent(uri: str, name: str, tmp_path: Path, **kw: object) -> Agent:
    config = AgentConfig(name=name, cluster=CLUSTER, broker=uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path / f"art-{name}", **kw)
    agent = Agent(config, KEY)
    agent.start()
    return agent


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for a in made:
        a.stop()


# -- real processes -------------------------------------------------------------------------

@pytest.mark.slow
def _departure(events: queue.Queue[ms.Event], timeout_s: float = 5.0) -> ms.Event:
    """The next device that left or was lost; states an agent publishes meanwhile (its
    int8 throughput, measured after it announced itself) are skipped."""
    deadline = time.monotonic() + timeout_s
    while True:
        event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if isinstance(event, (ms.DeviceLeft, ms.DeviceLost)):
            return event


def test_sigterm_exits_0_and_is_seen_left_while_kill_9_is_seen_lost(mosquitto,
                                                                     tmp_path: Path) -> None:
    key_file = keys.write(tmp_path / "cluster.key", KEY)
    events: queue.Queue[ms.Event] = queue.Queue()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with Coordinator(mosquitto.uri, CLUSTER, KEY) as c:
        c.on_change(lambda m, e: events.put(e))
        try:
            for name in ("gentle", "brutal"):
                procs[name] = subprocess.Popen(
                    [*agent_command(), "agent", "--name", name, "--cluster", CLUSTER,
                     "--broker", mosquitto.uri, "--key-file", str(key_file), "--no-advertise",
                     "--artifacts-dir", str(tmp_path / name), "--metrics-port", "0"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            c.wait_for(2, 60)
            while not events.empty():
                events.get()
            t_kill = time.monotonic()
            procs["brutal"].send_signal(signal.SIGKILL)
            lost = _departure(events)
            assert isinstance(lost, ms.DeviceLost) and lost.device == "brutal", lost
            assert "last will" in lost.why
            assert time.monotonic() - t_kill < 5
            procs["gentle"].send_signal(signal.SIGTERM)
            _, stderr = procs["gentle"].communicate(timeout=30)
            assert procs["gentle"].returncode == 0, stderr.decode()[-2000:]
            left = _departure(events)
            assert isinstance(left, ms.DeviceLeft) and left.device == "gentle", left
            log = stderr.decode()
            assert "SIGTERM: stopping" in log and "agent gentle stopped" in log
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                p.communicate(timeout=10)
    assert procs["brutal"].returncode == -signal.SIGKILL


# -- bad input --------------------------------------------------------------------------------

class BadPing(protocol.Model):
    """A ping whose seq is text: authentic, but not a valid command."""

    kind: Literal["ping"] = "ping"
    seq: str


def bad_inputs(cmd: str) -> dict[str, tuple[list[bytes], bool]]:
    """reason -> (payloads to publish on the agent's cmd topic, answered with an ErrorEvent)."""
    now = time.time()
    ping = protocol.seal(KEY, cmd, "coordinator", protocol.Ping(seq=1), now)
    envelope = json.loads(ping)
    del envelope["sig"]
    return {
        "malformed": ([b"{this is not json"], False),
        "oversized": ([b"x" * (protocol.MAX_MESSAGE_BYTES + 1)], False),
        "unsigned": ([json.dumps(envelope).encode()], False),
        "bad_signature": ([protocol.seal(b"\x07" * 32, cmd, "coordinator",
                                         protocol.Ping(seq=1), now)], False),
        "wrong_topic": ([protocol.seal(KEY, topics.cmd(CLUSTER, "someone-else"), "coordinator",
                                       protocol.Ping(seq=1), now)], True),
        "stale": ([protocol.seal(KEY, cmd, "coordinator", protocol.Ping(seq=1), now - 600)],
                  True),
        "replayed": ([ping, ping], False),
        "schema": ([protocol.seal(KEY, cmd, "coordinator", BadPing(seq="one"), now)], True),
        "unknown_deployment": ([protocol.seal(KEY, cmd, "coordinator",
                                              protocol.Teardown(deployment="nope"), now)], True),
    }


def rejected(agent: Agent, reason: str) -> float:
    url = f"http://127.0.0.1:{agent.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:  # the real endpoint
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("edgeswarm_rejected_messages_total{") and f'reason="{reason}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("reason", list(bad_inputs("x")))
def test_bad_input_is_refused_counted_and_the_agent_keeps_serving(
        reason: str, mosquitto, tmp_path: Path, agents: list[Agent]) -> None:
    agent = start_agent(mosquitto.uri, "target", tmp_path, metrics_port=0)
    agents.append(agent)
    cmd = topics.cmd(CLUSTER, "target")
    payloads, answered = bad_inputs(cmd)[reason]
    with Coordinator(mosquitto.uri, CLUSTER, KEY) as c, \
            ControlClient(mosquitto.uri, "attacker", key=KEY) as raw:
        c.wait_for(1, 10)
        assert rejected(agent, reason) == 0.0
        for payload in payloads:
            raw.publish_raw(cmd, payload)
        wait_until(lambda: rejected(agent, reason) == 1.0, what=f"{reason} counted")
        assert c.ping("target") < 1.0  # still serving
        if answered:
            wait_until(lambda: any(e.reason == reason for _, e in c.errors),
                       what=f"an ErrorEvent {reason}")
        else:
            assert not any(e.reason == reason for _, e in c.errors)


# -- deployments ------------------------------------------------------------------------------

def onnx_model(path: Path, weights: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """y = layers applied in order; each layer is relu(x @ W + b) but the last (no relu)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, name = [], [], "x"
    for i, (w, b) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [helper.make_node("MatMul", [name, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        name = f"a{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [name], [f"r{i}"]))
            name = f"r{i}"
    nodes.append(helper.make_node("Identity", [name], ["y"]))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                   ["n", weights[0][0].shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", weights[-1][0].shape[1]])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def manifest(deployment: str, store: tuple[str, int], shards: list[Shard],
             devices: list[str], timeout_s: float = 10.0) -> Manifest:
    ranks = {"coordinator": 0, **{d: i + 1 for i, d in enumerate(devices)}}
    return Manifest(deployment=deployment, generation=1, model="mlp", store_host=store[0],
                    store_port=store[1], world_size=len(ranks), ranks=ranks, shards=shards,
                    timeout_s=timeout_s)


def test_a_wrong_artifact_hash_is_refused_naming_both_hashes(
        mosquitto, tmp_path: Path, agents: list[Agent]) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    path = onnx_model(tmp_path / "m.onnx", [(w, np.zeros(3, np.float32))])
    agent = start_agent(mosquitto.uri, "a1", tmp_path, metrics_port=0)
    agents.append(agent)
    with ArtifactServer(tmp_path / "served") as server, \
            Coordinator(mosquitto.uri, CLUSTER, KEY) as c:
        real = server.add(path)
        wrong = "0" * 64
        forged = Artifact(name=real.name, sha256=wrong, size=real.size, url=real.url)
        shard = Shard(id="s1", device="a1", runtime="onnx", artifact=forged, recv_from=[0],
                      send_to=[0])
        c.wait_for(1, 10)
        with pytest.raises(DeployFailed) as info:
            c.deploy(manifest("d-bad", ("127.0.0.1", 1), [shard], ["a1"]), timeout_s=10,
                     join=False)
        error = info.value.errors["a1"]
        assert error.reason == "bad_artifact" and error.deployment == "d-bad"
        assert real.sha256 in error.detail and wrong in error.detail
        assert rejected(agent, "bad_artifact") == 1.0
        assert not list((tmp_path / "art-a1").glob("*"))  # nothing left in the cache
        assert agent.deployments is not None and agent.deployments.ids() == []
        assert c.ping("a1") < 1.0


@pytest.mark.slow
def test_a_two_stage_onnx_pipeline_reproduces_the_unsplit_model_then_tears_down(
        mosquitto, tmp_path: Path, no_leaked_threads, agents: list[Agent]) -> None:
    rng = np.random.default_rng(1)
    layers = [(rng.standard_normal((8, 16)).astype(np.float32),
               rng.standard_normal(16).astype(np.float32)),
              (rng.standard_normal((16, 4)).astype(np.float32),
               rng.standard_normal(4).astype(np.float32))]
    whole = onnx_model(tmp_path / "whole.onnx", layers)
    first = onnx_model(tmp_path / "first.onnx", [layers[0], (np.eye(16, dtype=np.float32),
                                                             np.zeros(16, np.float32))])
    second = onnx_model(tmp_path / "second.onnx", [layers[1]])
    for name in ("a1", "a2"):
        agents.append(start_agent(mosquitto.uri, name, tmp_path, metrics_port=0))
    with ArtifactServer(tmp_path / "served") as server, \
            Coordinator(mosquitto.uri, CLUSTER, KEY) as c:
        c.wait_for(2, 10)
        shards = [Shard(id="stage1", device="a1", runtime="onnx", artifact=server.add(first),
                        recv_from=[0], send_to=[2]),
                  Shard(id="stage2", device="a2", runtime="onnx", artifact=server.add(second),
                        recv_from=[1], send_to=[0])]
        m = manifest("mlp-1", c.store_endpoint(), shards, ["a1", "a2"])
        deployed = c.deploy(m, timeout_s=30)
        assert sorted(deployed) == ["a1", "a2"]
        assert deployed["a1"].shards == ["stage1"] and deployed["a2"].shards == ["stage2"]
        wait_until(lambda: all(s.deployments == ["mlp-1"] for s in c.devices()),
                   what="states listing the deployment")

        import onnxruntime as ort

        reference = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
        for _ in range(3):
            x = rng.standard_normal((2, 8)).astype(np.float32)
            (y,) = c.infer("mlp-1", [x])
            np.testing.assert_allclose(y, reference.run(None, {"x": x})[0], rtol=1e-5,
                                       atol=1e-5)

        torn = c.teardown("mlp-1")
        assert sorted(torn) == ["a1", "a2"]
        assert all(a.deployments is not None and a.deployments.ids() == [] for a in agents)
        wait_until(lambda: all(s.deployments == [] for s in c.devices()),
                   what="states without the deployment")
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{agents[0].metrics_port}/metrics", timeout=5).read().decode()
        assert 'edgeswarm_requests_total{device="a1"} 3.0' in metrics
        assert 'edgeswarm_shards_loaded{device="a1"} 0.0' in metrics
        with pytest.raises(DeployFailed, match="unknown_deployment"):
            c.teardown("mlp-1", devices=["a1"], timeout_s=5)


def test_a_clean_stop_leaves_a_retained_offline_state(mosquitto, tmp_path: Path,
                                                       no_leaked_threads) -> None:
    agent = start_agent(mosquitto.uri, "brief", tmp_path)
    with pytest.raises(InvalidInput, match="already called"):
        agent.start()
    agent.stop()
    agent.stop()  # twice is harmless
    got: queue.Queue[bytes] = queue.Queue()
    with ControlClient(mosquitto.uri, "late", key=KEY) as late:
        late.subscribe(topics.state(CLUSTER, "brief"), lambda t, raw: got.put(raw))
        raw = got.get(timeout=5)
    _, state = protocol.unseal(KEY, topics.state(CLUSTER, "brief"), raw, time.time(), None,
                               protocol.DeviceState, None)
    assert state.status == "offline" and state.device.id == "brief"
