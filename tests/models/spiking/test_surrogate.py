"""Training through time: the differentiable SNN is the executor's, and training helps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeswarm.models.spiking import convert, simulate
from edgeswarm.models.spiking.qcfs import QCFS, with_qcfs
from edgeswarm.models.spiking.surrogate import (
    ThroughTimeRecipe,
    finetune_through_time,
    spiking_logits,
)
from edgeswarm.models.zoo import ZooModel
from edgeswarm.models.zoo.training import deterministic
from edgeswarm.placement.errors import InvalidInput


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_the_differentiable_snn_runs_like_the_executor(name: str, request) -> None:
    model: ZooModel = request.getfixturevalue(name)
    net = with_qcfs(model.module, model.calibration[0], levels=4)
    x = model.heldout.inputs[0][:128]
    with torch.no_grad():
        mine = spiking_logits(net, x, steps=6)
    run = simulate(convert(net, model.calibration[0], frac_bits=20), x, steps=6)
    # the executor rounds weights to fixed point; spikes rarely move a step because of it
    agree = (mine.argmax(-1) == run.logits.argmax(-1)).double().mean(1)
    assert float(agree.min()) >= 0.97
    assert float((mine - run.logits).abs().mean()) < 0.02 * float(run.logits.abs().mean())


def test_training_through_time_recovers_from_thresholds_set_too_high(mlp: ZooModel) -> None:
    x, y = mlp.calibration[0], mlp.module(mlp.calibration[0]).argmax(-1)
    net = with_qcfs(mlp.module, x, levels=4)
    for layer in net.modules():
        if isinstance(layer, QCFS):
            layer.start.mul_(4.0)  # a quarter of the spikes: 4 steps say little

    def loss() -> float:
        with torch.no_grad():
            logits = spiking_logits(net, x, steps=4)[2:]
            return float(nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(2)))

    before = loss()
    with deterministic(0):
        finetune_through_time(net, x, y, ThroughTimeRecipe(steps=4, samples=256,
                                                           batch_size=32, lr=1e-2))
    assert loss() < 0.5 * before  # measured: 1.14 -> 0.29


def test_what_cannot_run_through_time_is_refused(mlp: ZooModel) -> None:
    x = mlp.calibration[0][:4]
    with pytest.raises(InvalidInput, match="no QCFS"):
        spiking_logits(nn.Sequential(nn.Linear(64, 10)), x, steps=2)
    with pytest.raises(InvalidInput, match="Sigmoid"):
        spiking_logits(nn.Sequential(nn.Linear(64, 10), nn.Sigmoid()), x, steps=2)
    with pytest.raises(InvalidInput, match=r"nn\.Sequential"):
        spiking_logits(nn.Linear(64, 10), x, steps=2)
    with pytest.raises(InvalidInput, match="steps"):
        spiking_logits(with_qcfs(mlp.module, x, 2), x, steps=0)
    pooled = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU())
    with pytest.raises(InvalidInput, match="between a layer and its activation"):
        spiking_logits(with_qcfs(pooled, torch.rand(8, 1, 6, 6), 2), torch.rand(2, 1, 6, 6), 2)
    with pytest.raises(InvalidInput, match="samples"):
        finetune_through_time(with_qcfs(mlp.module, x, 2), x, torch.zeros(4, dtype=torch.long),
                              ThroughTimeRecipe(steps=2, samples=64))
