"""A spiking deployment through the front door: ``place(model, runtime="snn")`` picks the
agent that declares spiking hardware, ``deploy(..., runtime="snn")`` ships the converted
model, results equal the SNN run in this process, and when that agent leaves the
deployment moves to the other agent, which simulates the SNN on its CPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeswarm.cluster import Cluster, prepare
from edgeswarm.device_agent import keys
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.broker import EmbeddedBroker
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.snn_plans import compiled, device_of

CLUSTER = "spiking"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, Agent]]]:
    key = keys.generate()
    with EmbeddedBroker() as broker:
        agents: dict[str, Agent] = {}
        cluster = None
        try:
            for name, prefer in (("npu", ["snn"]), ("cpu", [])):
                cfg = AgentConfig(name=name, cluster=CLUSTER, broker=broker.uri,
                                  advertise=False, artifacts_dir=tmp_path / name,
                                  profile_s=0.05, prefer_runtimes=prefer)
                agents[name] = Agent(cfg, key)
                agents[name].start()
            cluster = Cluster.connect(broker.uri, CLUSTER, key, expect=2, timeout_s=30,
                                      heartbeat_timeout_s=5.0)
            yield cluster, agents
        finally:
            if cluster is not None:
                cluster.close()
            for agent in agents.values():
                agent.stop()


@pytest.mark.slow
def test_a_spiking_model_runs_on_the_spiking_device_and_moves_when_it_leaves(lab):
    cluster, agents = lab
    model = prepare("digits-cnn")
    x = model.calibration[0][:32]
    expected = compiled(model).exe.run([x.numpy()])[0]
    plan = cluster.place(model, runtime="snn")
    assert device_of(plan) == "npu" and plan.policy == "snn"
    with cluster.deploy(model, plan, runtime="snn") as dep:
        first = dep.run(x).numpy()
        assert dep.generations[-1].predicted_s > 0
        agents["npu"].stop()                                   # the spiking device leaves
        second = dep.run(x).numpy()
        assert dep.generation == 2 and device_of(dep.plan) == "cpu"
    np.testing.assert_array_equal(first, expected)            # integer arithmetic: exact
    np.testing.assert_array_equal(second, expected)


def test_a_plan_over_two_devices_is_refused_for_snn():
    plan = Plan({"a": ("x",), "b": ("y",)})
    with pytest.raises(InvalidInput, match=r"one device, and the plan uses 2 \(x, y\)"):
        device_of(plan)
