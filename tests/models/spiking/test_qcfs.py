"""QCFS: the quantized activation, its thresholds, and what conversion makes of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeswarm.models.spiking import convert, simulate
from edgeswarm.models.spiking.qcfs import (
    FACTORS,
    QCFS,
    QcfsRecipe,
    SopMeter,
    finetune,
    fit_thresholds,
    with_qcfs,
)
from edgeswarm.models.zoo import ZooModel
from edgeswarm.models.zoo.training import deterministic
from edgeswarm.placement.errors import InvalidInput


def test_qcfs_rounds_to_levels_clips_and_passes_gradients_straight_through():
    q = QCFS(levels=4, threshold=2.0)
    x = torch.tensor([-1.0, 0.0, 0.24, 0.26, 0.9, 1.3, 1.76, 2.0, 5.0], requires_grad=True)
    y = q(x)
    # levels of λ / L = 0.5; x / λ * L + 1/2 floors: 0.24 -> 0, 0.26 -> 0.5, 1.76 -> 2.0
    assert y.tolist() == [0.0, 0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    y.sum().backward()
    assert x.grad is not None and q.gain.grad is not None
    # the identity's gradient inside (0, λ), none where the clip holds
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert float(q.threshold.detach()) == 2.0 and float(q.gain.grad) > 0


def test_with_qcfs_replaces_every_relu_at_its_percentile(mlp: ZooModel):
    calib = mlp.calibration[0]
    net = with_qcfs(mlp.module, calib, levels=8, percentile=99.0)
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    layers = [m for m in net.modules() if isinstance(m, QCFS)]
    assert len(layers) == 2 and all(q.levels == 8 for q in layers)
    assert any(isinstance(m, nn.ReLU) for m in mlp.module.modules())  # the original stays
    with torch.inference_mode():
        first = mlp.module.fc1(calib)
    want = np.percentile(first[first > 0].numpy(), 99.0)
    assert float(layers[0].threshold) == pytest.approx(want, rel=1e-6)


def test_fit_thresholds_never_scores_worse_than_the_percentile(mlp: ZooModel):
    x, y = mlp.calibration[0], mlp.module(mlp.calibration[0]).argmax(-1)
    net = with_qcfs(mlp.module, x, levels=2)
    before = float((net(x).argmax(-1) == y).double().mean())
    factors = fit_thresholds(net, x, y)
    after = float((net(x).argmax(-1) == y).double().mean())
    assert len(factors) == 2 and set(factors) <= set(FACTORS)
    assert after >= before  # factor 1.0 is among the candidates of every layer
    assert after > 0.8


def test_conversion_takes_lambda_as_threshold_and_the_shift_as_rounding(mlp: ZooModel):
    """With a constant input current, T = L steps fire exactly L * QCFS(x) / λ spikes."""
    levels = 4
    x = mlp.heldout.inputs[0][:64]
    net = with_qcfs(mlp.module, mlp.calibration[0], levels)
    lam = [float(m.threshold) for m in net.modules() if isinstance(m, QCFS)]
    snn = convert(net, mlp.calibration[0], frac_bits=20)
    scales = [s.scale for s in snn.synapses[:-1]]
    assert [float(s.unique()) for s in scales] == pytest.approx(lam)
    run = simulate(snn, x, steps=levels)
    with torch.inference_mode():
        levels_fired = net.relu1(net.fc1(x)) / lam[0] * levels
    # every first-layer neuron's count is its QCFS level (fixed-point rounding aside)
    assert run.spikes["fc2"] == pytest.approx(float(levels_fired.sum()), rel=1e-3)


def test_bad_qcfs_settings_are_refused(mlp: ZooModel):
    with pytest.raises(InvalidInput, match="levels"):
        QCFS(0, 1.0)
    with pytest.raises(InvalidInput, match="threshold"):
        QCFS(4, 0.0)
    with pytest.raises(InvalidInput, match=r"nn\.Sequential"):
        with_qcfs(nn.Linear(64, 10), mlp.calibration[0], 4)
    with pytest.raises(InvalidInput, match=r"no nn\.ReLU"):
        with_qcfs(nn.Sequential(nn.Linear(64, 10)), mlp.calibration[0], 4)


def test_the_sop_meter_predicts_the_executors_sops(cnn: ZooModel):
    x = cnn.heldout.inputs[0][:128]
    net = with_qcfs(cnn.module, cnn.calibration[0], levels=8)
    meter = SopMeter(net)
    with torch.no_grad():
        net(x)
    predicted = float(meter.rate())
    meter.close()
    snn = convert(net, cnn.calibration[0])
    run = simulate(snn, x, steps=32)
    measured = float(run.sops.sum(0).mean()) / 32 / snn.ann_macs()
    # the executor does not count additions with the zero padding; the meter does
    assert 0.9 * measured < predicted < 1.25 * measured


def test_the_sop_penalty_makes_the_network_spike_less(mlp: ZooModel):
    x = mlp.calibration[0]
    with torch.no_grad():
        y = mlp.module(x).argmax(-1)

    def tuned(weight: float) -> tuple[float, float]:
        net = with_qcfs(mlp.module, x, levels=4)
        with deterministic(0):
            finetune(net, x, y, QcfsRecipe(levels=4, epochs=3, batch_size=32, lr=2e-3,
                                           sop_weight=weight, steps=4))
        meter = SopMeter(net)
        with torch.no_grad():
            agree = float((net(x).argmax(-1) == y).double().mean())
        rate = float(meter.rate())
        meter.close()
        return rate, agree

    (plain, plain_agree), (sparse, sparse_agree) = tuned(0.0), tuned(1.0)
    assert sparse < 0.8 * plain
    assert plain_agree > 0.9 and sparse_agree > 0.85


def test_the_sop_meter_needs_a_weighted_first_layer():
    with pytest.raises(InvalidInput, match="start with a weighted layer"):
        SopMeter(nn.Sequential(nn.Flatten(), QCFS(2, 1.0), nn.Linear(4, 2)))
