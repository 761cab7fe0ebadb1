"""An ONNX file placed, deployed and run across agents on loopback, as a zoo name is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeswarm.cluster import Cluster
from edgeswarm.device_agent import keys
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.broker import EmbeddedBroker
from edgeswarm.models import zoo
from edgeswarm.models.runtimes.onnx_export import export_onnx
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan

NAMES = ("fast", "mid", "slow")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Cluster, dict[str, Agent]]]:
    key = keys.generate()
    with EmbeddedBroker() as broker:
        agents: dict[str, Agent] = {}
        try:
            for name, speed in zip(NAMES, (1.0, 0.5, 0.25), strict=True):
                cfg = AgentConfig(name=name, cluster="onnx", broker=broker.uri, speed=speed,
                                  advertise=False, artifacts_dir=tmp_path / name,
                                  profile_s=0.05)
                agents[name] = Agent(cfg, key)
                agents[name].start()
            with Cluster.connect(broker.uri, "onnx", key, expect=3, timeout_s=20) as cluster:
                yield cluster, agents
        finally:
            for agent in agents.values():
                agent.stop()


@pytest.mark.slow
def test_an_onnx_file_runs_split_like_onnx_runtime_on_the_whole_file(lab, tmp_path) -> None:
    cluster, agents = lab
    z = zoo.load("digits-cnn")
    path = tmp_path / "digits.onnx"
    export_onnx(z.module, list(z.example_inputs), path, ["x"], ["logits"])
    x = z.heldout.batch(0, 16)[0]
    want = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]

    planned = cluster.place(str(path), [x], policy="heft")   # costs for a batch of 16
    assert {t for t in planned.assignments} >= {"input:x", "node_conv2d"}
    tasks = list(planned.assignments)
    plan = Plan({t: (NAMES[min(2, 3 * i // len(tasks))],) for i, t in enumerate(tasks)})
    with cluster.deploy(path, plan, [x]) as dep:
        assert dep.devices == NAMES
        assert dep.predicted_latency_s > 0
        y = dep.run(x)
        assert isinstance(y, torch.Tensor) and np.array_equal(y.numpy(), want)
        y1 = dep.run(x[:3].numpy())                            # any batch, numpy in and out
        assert isinstance(y1, np.ndarray) and np.array_equal(y1, want[:3])
        with pytest.raises(InvalidInput, match="expected dtype float32"):
            dep.run(np.zeros((2, 1, 8, 8), np.int64))

        agents["mid"].stop()                                   # re-planned, re-cut
        assert np.array_equal(dep.run(x).numpy(), want)
        assert "mid" not in dep.devices and dep.generation >= 2

    with pytest.raises(InvalidInput, match="feature codecs"):
        cluster.place(path, [x], codecs=["int8"])
