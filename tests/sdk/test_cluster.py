"""The front door end to end on loopback: agents, a broker, a split model, a device leaving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeswarm.cluster import Cluster, prepare
from edgeswarm.device_agent import keys
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.broker import EmbeddedBroker
from edgeswarm.device_agent.manifest import LinkShape
from edgeswarm.models import zoo
from edgeswarm.models.runtimes import load
from edgeswarm.placement.errors import InvalidInput, ModelFileError, PlacementInfeasible
from edgeswarm.placement.plan import Plan

SPEEDS = {"fast": 1.0, "mid": 0.5, "slow": 0.25}
LINK = LinkShape(bandwidth_Bps=12.5e6, latency_s=0.002)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, Agent]]]:
    key = keys.generate()
    with EmbeddedBroker() as broker:
        agents: dict[str, Agent] = {}
        try:
            for name, speed in SPEEDS.items():
                cfg = AgentConfig(name=name, cluster="sdk", broker=broker.uri, speed=speed,
                                  advertise=False, artifacts_dir=tmp_path / name,
                                  profile_s=0.05, links={"*": LINK})
                agents[name] = Agent(cfg, key)
                agents[name].start()
            cluster = Cluster.connect(broker.uri, "sdk", key, expect=3, timeout_s=20)
            try:
                yield cluster, agents
            finally:
                cluster.close()
        finally:
            for agent in agents.values():
                agent.stop()


def three_way(graph_tasks: list[str]) -> Plan:
    names = list(SPEEDS)
    k = len(graph_tasks)
    return Plan({t: (names[min(2, 3 * i // k)],) for i, t in enumerate(graph_tasks)})


@pytest.mark.slow
def test_a_split_model_runs_like_one_device_and_survives_a_device_leaving(lab) -> None:
    cluster, agents = lab
    topo = cluster.topology()
    assert sorted(d.id for d in topo.devices) == ["fast", "mid", "slow"]
    flops = {d.id: d.flops for d in topo.devices}
    assert all(f > 0 for f in flops.values())               # measured, times --speed
    assert {s.device.id: s.device.speed for s in cluster.devices} == SPEEDS
    link = topo.link("fast", "slow")   # the emulated link on top of the probed real path
    assert LINK.latency_s < link.latency_s < LINK.latency_s + 0.01
    assert 0.5 * LINK.bandwidth_Bps < link.bandwidth_Bps < LINK.bandwidth_Bps

    z = zoo.load("digits-cnn")
    model = prepare("digits-cnn")
    plan = three_way([t.id for t in model.graph.tasks])
    with cluster.deploy(model, plan) as dep:
        assert dep.devices == ("fast", "mid", "slow") and dep.generation == 1
        assert dep.predicted_latency_s > 3 * LINK.latency_s   # four hops, three shaped
        x = z.heldout.inputs[0][:8]
        y = dep.run(x)
        assert isinstance(y, torch.Tensor)
        # bitwise what the same stage files give on one device, and the torch model to 1e-5
        by_hash = {art.sha256: sf.path for sf, art in dep._cache._files.values()}
        values = [x.numpy()]
        assert dep._manifest is not None
        for shard in dep._manifest.shards:
            values = load(by_hash[shard.artifact.sha256]).run(values)
        assert np.array_equal(y.numpy(), values[0])
        with torch.inference_mode():
            np.testing.assert_allclose(y.numpy(), z.module(x).numpy(), atol=1e-5)
        assert isinstance(dep.run(x.numpy()), np.ndarray)    # numpy in, numpy out

        with pytest.raises(InvalidInput, match="expected dtype float32 and shape"):
            dep.run(torch.zeros(2, 3, 3))
        assert np.array_equal(dep.run(x).numpy(), y.numpy())  # still serving

        agents["mid"].stop()                                  # a device leaves
        y2 = dep.run(x)
        assert np.allclose(y2.numpy(), y.numpy(), atol=1e-5)
        assert "mid" not in dep.devices and dep.generation >= 2
        assert "device mid left" in dep.generations[-1].reason
        assert len(dep.generations[0].measured_s) == 3


def test_placing_on_an_empty_cluster_names_the_cluster(lab) -> None:
    cluster, _ = lab
    with pytest.raises(PlacementInfeasible, match="no online device"):
        cluster.topology(without=list(SPEEDS))
    with pytest.raises(ModelFileError, match=r"ONNX file model\.onnx does not exist"):
        cluster.place("model.onnx")
    with pytest.raises(InvalidInput, match="example_inputs"):
        cluster.place(torch.nn.Linear(2, 2))
