"""A spiking (``snn``) shard on a real agent: the profile lists the runtime, the planner
places the converted model on the agent, the agent fetches the ``.snn`` artifact, verifies
and loads it, and answers requests through the coordinator (rank 0 of a real gloo group)
with the very logits ``compile(..., runtime="snn")`` gives in this process."""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeswarm.device_agent import profile
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.artifacts import ArtifactServer
from edgeswarm.device_agent.coordinator import Coordinator
from edgeswarm.device_agent.manifest import Manifest, Shard
from edgeswarm.models import zoo
from edgeswarm.models.runtimes import compile
from edgeswarm.models.spiking.placement import TASK, SpikingCost, spiking_task_graph
from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.policies import place

KEY = bytes(range(32))
CLUSTER = "snn"


@pytest.fixture
def agent(mosquitto, tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig(name="npu", cluster=CLUSTER, broker=mosquitto.uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path / "art",
                         prefer_runtimes=["snn"])   # spiking hardware, as --prefer-runtime
    a = Agent(config, KEY)
    a.start()
    yield a
    a.stop()


def test_the_profile_lists_snn_and_puts_preferred_runtimes_first() -> None:
    assert "snn" in profile.installed_runtimes()
    preferred = profile.installed_runtimes(prefer=["snn"])
    assert preferred[0] == "snn" and sorted(preferred) == sorted(profile.installed_runtimes())
    with pytest.raises(InvalidInput, match="not installed"):
        profile.installed_runtimes(prefer=["loihi-2"])


def test_an_agent_preferring_a_runtime_it_lacks_refuses_to_start(mosquitto,
                                                                 tmp_path: Path) -> None:
    config = AgentConfig(name="npu", cluster=CLUSTER, broker=mosquitto.uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path / "art",
                         prefer_runtimes=["loihi-2"])
    agent = Agent(config, KEY)
    with pytest.raises(InvalidInput, match="loihi-2 not installed"):
        agent.start()
    agent.stop()


def test_an_agent_runs_a_planned_snn_shard_like_compile(mosquitto, agent: Agent,
                                                        tmp_path: Path,
                                                        no_leaked_threads) -> None:
    model = zoo.load("digits-cnn")
    exe = compile("digits-cnn", runtime="snn", output=tmp_path / "digits")
    assert exe.path is not None and exe.path.suffix == ".snn"
    x = model.heldout.inputs[0][:64].numpy()
    expected = exe.run([x])[0]
    with ArtifactServer(tmp_path / "served") as server, \
            Coordinator(mosquitto.uri, CLUSTER, KEY) as c:
        c.wait_for(1, 10)
        (state,) = c.devices()
        assert state.device.runtimes[0] == "snn"  # the agent's profile: preferred first
        # the planner sees the agent next to a device without the runtime
        cluster = Cluster((state.device.to_device(),
                           Device(DeviceId("gpu"), state.device.flops * 100, 1 << 34,
                                  ("onnx",))), default_link=LinkSpec(1e8, 1e-3))
        graph = spiking_task_graph(cluster, SpikingCost.measure(exe, [x[:16]]), "digits-cnn")
        plan = place(graph, cluster)
        (device,) = plan.devices_of(TASK)
        assert device == "npu"
        shard = Shard(id="snn", device=device, runtime="snn", artifact=server.add(exe.path),
                      recv_from=[0], send_to=[0])
        store = c.store_endpoint()
        manifest = Manifest(deployment="digits-snn", generation=1, model="digits-cnn",
                            store_host=store[0], store_port=store[1], world_size=2,
                            ranks={"coordinator": 0, device: 1}, shards=[shard],
                            timeout_s=30.0)
        deployed = c.deploy(manifest, timeout_s=60)
        assert deployed[device].shards == ["snn"]
        try:
            (logits,) = c.infer("digits-snn", [x])
            (again,) = c.infer("digits-snn", [x[:5]])
        finally:
            c.teardown("digits-snn")
    # integer arithmetic in the executor: the agent's logits are exactly this process's
    assert logits.dtype == np.float32 and logits.shape == expected.shape
    np.testing.assert_array_equal(logits, expected)
    np.testing.assert_array_equal(again, expected[:5])
    accuracy = float((logits.argmax(-1) == model.heldout.labels[:64].numpy()).mean())
    assert accuracy > 0.9
