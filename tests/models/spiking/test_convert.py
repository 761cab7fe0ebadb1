"""ANN -> SNN conversion: accuracy on real held-out data, the balancing, what cannot convert."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeswarm.models.spiking import Synapse, convert, simulate
from edgeswarm.placement.errors import InvalidInput

N = 200  # held-out inputs scored per model (the bench scores all of them)


def test_mlp_snn_is_within_a_point_and_a_half_of_the_ann(mlp, mlp_net, ann_accuracy):
    """Stated tolerance: 1.5 points on 200 inputs (the bench's 1-point target is on 450)."""
    run = simulate(mlp_net, mlp.heldout.inputs[0][:N], steps=8)
    snn = float((run.final.argmax(-1) == mlp.heldout.labels[:N]).double().mean())
    assert snn >= ann_accuracy(mlp, N) - 0.015
    # rate coding converges: one step is clearly worse than eight
    assert float((run.logits[0].argmax(-1) == mlp.heldout.labels[:N]).double().mean()) < snn


def test_cnn_snn_is_within_a_point_and_a_half_of_the_ann(cnn, cnn_net, ann_accuracy):
    run = simulate(cnn_net, cnn.heldout.inputs[0][:N], steps=4)
    snn = float((run.final.argmax(-1) == cnn.heldout.labels[:N]).double().mean())
    assert snn >= ann_accuracy(cnn, N) - 0.015


def test_the_chain_keeps_the_layers_in_order(cnn_net):
    kinds = [type(op).__name__ for op in cnn_net.ops]
    assert kinds == ["Synapse", "Synapse", "MaxPool", "Synapse", "MaxPool", "Flatten",
                     "Synapse", "Synapse"]
    synapses = cnn_net.synapses
    assert [s.spiking for s in synapses] == [True, True, True, True, False]
    assert cnn_net.ann_macs() == 32 * 64 * 9 + 64 * 64 * 288 + 64 * 16 * 576 + 256 * 64 + 640
    assert cnn_net.input_macs() == 32 * 64 * 9


def test_thresholds_are_balanced_at_the_activation_percentile():
    """One hidden layer: its scale is the percentile of each channel's positive activations;
    a channel that (nearly) never fires takes the whole layer's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 1.0, 0], [0, 0, 0, 1.0]]))
        model[0].bias.copy_(torch.tensor([0.0, -0.5, -5.0]))  # the third channel is dead
    calib = torch.rand(500, 4)
    net = convert(model, calib, percentile=99.0)
    with torch.no_grad():
        act = torch.relu(model[0](calib)).double()
    scale = net.synapses[0].scale
    for c in (0, 1):
        col = act[:, c]
        assert float(scale[c]) == pytest.approx(np.percentile(col[col > 0].numpy(), 99.0))
    live = act[act > 0]
    assert float(scale[2]) == pytest.approx(np.percentile(live.numpy(), 99.0))
    # the hidden layer's weights are divided by its scale, in fixed point
    one = net.one
    w = model[0].weight.detach().double() / scale[:, None]
    assert torch.equal(net.synapses[0].weight, torch.round(w * one))
    # the output layer gets the scale back, staying in logit units
    w2 = model[2].weight.detach().double() * scale[None, :]
    assert torch.equal(net.synapses[1].weight, torch.round(w2 * one))


class _Block(nn.Module):
    """Not a Sequential: torch.fx traces it; BatchNorm and a pool before the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pool(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


def test_batchnorm_folds_and_rates_converge_to_the_ann():
    """With enough steps and no clipping, output rates give back the ANN's logits."""
    torch.manual_seed(1)
    model = _Block().eval()
    with torch.no_grad():  # non-trivial running statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.1, 0.3)
    x = torch.rand(32, 2, 8, 8)
    net = convert(model, x, percentile=100.0)
    assert isinstance(net.ops[0], Synapse) and net.ops[0].stride == (2, 2)
    run = simulate(net, x, steps=128)
    with torch.no_grad():
        want = model(x).double()
    err = (run.final - want).abs().max()
    assert err < 0.02 * want.abs().max(), err


@pytest.mark.parametrize(("model", "message"), [
    (nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 2)), "Sigmoid"),
    (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "exactly one ReLU"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU()), "last weighted"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.ReLU(), nn.Flatten(),
                   nn.LazyLinear(2)), "plain convolutions"),
    (nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)), "does not follow"),
])
def test_layers_without_a_spiking_equivalent_are_named(model, message):
    with pytest.raises(InvalidInput, match=message):
        convert(model, torch.rand(8, 4) if not isinstance(model[0], nn.Conv2d)
                else torch.rand(8, 1, 6, 6))


class _Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def test_branches_are_refused():
    with pytest.raises(InvalidInput, match="straight chain"):
        convert(_Skip(), torch.rand(8, 4))


def test_bad_calibration_and_settings_are_refused(mlp):
    with pytest.raises(InvalidInput, match="calibration"):
        convert(mlp.module, torch.zeros(0, 64))
    with pytest.raises(InvalidInput, match="percentile"):
        convert(mlp.module, mlp.calibration[0], percentile=0)
    with pytest.raises(InvalidInput, match="v_init"):
        convert(mlp.module, mlp.calibration[0], v_init=1.0)
