"""A tiny training run end to end: files written, weights reloaded, used by the policy."""

import json

import pytest
import torch

from edgeswarm.placement.gnn import checkpoint, policy
from edgeswarm.placement.gnn.train import train
from edgeswarm.placement.policies import Options
from edgeswarm.placement.problem import Problem


def test_tiny_training_run_writes_a_loadable_checkpoint(tmp_path, heft_paper):
    seen = []
    result = train(tmp_path, minutes=5.0, seed=1, episodes=4, val_size=2, eval_every=2,
                   norm_instances=2, progress=seen.append)
    assert result.episodes == 4
    for path in (result.weights, result.config, result.curve):
        assert path.exists() and path.stat().st_size > 0
    assert result.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(result.config.read_text())
    assert doc["format"] == checkpoint.FORMAT
    assert doc["training"]["seed"] == 1
    assert set(doc["normalisation"]) == set(doc["features"])
    assert doc["metrics"]["episodes"] == 4
    assert seen[-1]["done"] and [s["episode"] for s in seen[:-1]] == [1, 2, 3, 4]
    model = checkpoint.load(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(result.weights))
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, saved[name])
    sol = policy.solve(Problem(*heft_paper), Options(), checkpoint=tmp_path)
    assert len(sol.groups) == 10


@pytest.mark.slow
def test_training_is_deterministic_for_a_seed(tmp_path):
    a = train(tmp_path / "a", seed=2, episodes=6, val_size=2, eval_every=3, norm_instances=2)
    b = train(tmp_path / "b", seed=2, episodes=6, val_size=2, eval_every=3, norm_instances=2)
    assert a.weights.read_bytes() == b.weights.read_bytes()
    assert a.metrics == {**b.metrics, "train_minutes": a.metrics["train_minutes"]}
