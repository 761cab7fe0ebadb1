"""A tensor-parallel deployment end to end on loopback: agents, a broker, minilm split by
heads over a group of three, a member leaving and the group re-planned without it."""

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
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.tp_plans import group_of, group_plan

NAMES = ("a", "b", "c")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, Agent]]]:
    key = keys.generate()
    with EmbeddedBroker() as broker:
        agents: dict[str, Agent] = {}
        try:
            for name in NAMES:
                cfg = AgentConfig(name=name, cluster="tp", broker=broker.uri,
                                  advertise=False, artifacts_dir=tmp_path / name,
                                  profile_s=0.05)
                agents[name] = Agent(cfg, key)
                agents[name].start()
            cluster = Cluster.connect(broker.uri, "tp", key, expect=3, timeout_s=20)
            try:
                yield cluster, agents
            finally:
                cluster.close()
        finally:
            for agent in agents.values():
                agent.stop()


@pytest.mark.slow
def test_minilm_on_a_group_equals_one_device_and_survives_a_member_leaving(lab) -> None:
    cluster, agents = lab
    model = prepare("minilm")
    ids, mask = model.example_inputs
    with torch.inference_mode():
        want = model.module(ids, mask).numpy()
    plan = group_plan(model.graph, list(NAMES))
    with cluster.deploy(model, plan) as dep:
        assert dep.devices == NAMES and dep.generation == 1
        assert dep.predicted_latency_s > 0
        y = dep.run(ids, mask)
        assert np.abs(y.numpy() - want).max() < 1e-4
        assert dep._manifest is not None
        assert [s.tp_group for s in dep._manifest.shards] == [[1, 2, 3]] * 3
        with pytest.raises(InvalidInput, match="expected dtype int64"):
            dep.run(ids.float(), mask)

        agents["b"].stop()                                   # a member leaves
        y2 = dep.run(ids, mask)
        assert np.abs(y2.numpy() - want).max() < 1e-4
        assert "b" not in dep.devices and dep.generation >= 2
        assert "device b left" in dep.generations[-1].reason
        assert group_of(dep.plan) in (None, ("a", "c"), ("c", "a"))


def test_place_with_tp_picks_a_group_of_the_fastest_devices(lab) -> None:
    cluster, _ = lab
    plan = cluster.place("minilm", tp=True)
    group = group_of(plan) or plan.assignments[next(iter(plan.assignments))]
    assert set(group) <= set(NAMES) and plan.predicted_latency_s > 0
    with pytest.raises(InvalidInput, match="not both"):
        cluster.place("minilm", tp=True, codecs=["fp16"])
    with pytest.raises(InvalidInput, match="no tensor-parallel split"):
        cluster.place("digits-cnn", tp=True)
