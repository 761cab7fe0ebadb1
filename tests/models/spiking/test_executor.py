"""The executors: SOPs against hand-computed networks, event-driven == dense, early exit."""

from __future__ import annotations

import pytest
import torch

from edgeswarm.models.spiking import (
    MaxPool,
    SpikingNetwork,
    Synapse,
    simulate,
    simulate_batched,
)
from edgeswarm.models.spiking.executor import _pool_step
from edgeswarm.placement.errors import InvalidInput

BITS = 4
ONE = 2.0 ** BITS  # the threshold in fixed point


def _f(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _linear_net() -> SpikingNetwork:
    """2 inputs -> 3 IF neurons -> 2 outputs.

    With input (1, 0) the hidden drive is (1, 1/2, 0) thresholds a step: from v = 0 the
    first neuron fires every step, the second every other step (t = 2, 4), the third never.
    Each hidden spike reaches both outputs: 2 SOPs.
    """
    hidden = Synapse("fc1", "linear", _f([[ONE, 0], [ONE / 2, 0], [0, ONE]]), _f([0, 0, 0]),
                     (2,), (3,), spiking=True)
    out = Synapse("fc2", "linear", _f([[ONE, 0, 0], [0, ONE, 3 * ONE]]), _f([0, ONE]),
                  (3,), (2,), spiking=False)
    return SpikingNetwork((2,), (), (hidden, out), BITS, 0.0, 100.0)


@pytest.mark.parametrize("mode", ["event", "dense"])
def test_sops_and_outputs_of_a_hand_computed_linear_network(mode):
    run = simulate(_linear_net(), torch.tensor([[1.0, 0.0]]), steps=4, mode=mode)
    assert run.sops[:, 0].tolist() == [2, 4, 2, 4]  # spikes: 1, 2, 1, 2 (x 2 synapses)
    assert run.spikes == {"fc2": 6}
    # outputs: (spikes of neuron 0, spikes of neuron 1 + 1 bias a step) / steps
    assert run.logits[:, 0].tolist() == [[1, 1], [1, 1.5], [1, 4 / 3], [1, 1.5]]
    assert run.steps.tolist() == [4]


def _conv_net(stride: int) -> SpikingNetwork:
    """A 1x1 identity conv makes each input pixel's neuron fire every step it is 1; then a
    3x3 conv (padding 1) with 2 output channels, the output layer."""
    first = Synapse("c1", "conv", torch.full((1, 1, 1, 1), ONE, dtype=torch.float64),
                    _f([0]), (1, 3, 3), (1, 3, 3), spiking=True, padding=(0, 0))
    side = (3 + 2 - 3) // stride + 1
    second = Synapse("c2", "conv", torch.ones(2, 1, 3, 3, dtype=torch.float64), _f([0, 0]),
                     (1, 3, 3), (2, side, side), spiking=False, stride=(stride, stride))
    return SpikingNetwork((1, 3, 3), (), (first, second), BITS, 0.0, 100.0)


@pytest.mark.parametrize("mode", ["event", "dense"])
@pytest.mark.parametrize(("pixel", "stride", "sops"), [
    ((0, 0), 1, 2 * 4),  # a corner reaches 4 of the 9 output positions, x 2 channels
    ((0, 1), 1, 2 * 6),  # an edge reaches 6
    ((1, 1), 1, 2 * 9),  # the centre reaches all 9
    ((0, 0), 2, 2 * 1),  # stride 2: outputs at (0, 0), (0, 2), (2, 0), (2, 2) of the padded
    ((1, 1), 2, 2 * 4),  # grid; the centre feeds all four, a corner only its own
    ((0, 1), 2, 2 * 2),
])
def test_conv_sops_count_border_and_stride(mode, pixel, stride, sops):
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, pixel[0], pixel[1]] = 1.0
    run = simulate(_conv_net(stride), x, steps=3, mode=mode)
    assert run.sops[:, 0].tolist() == [sops] * 3


def test_the_pool_passes_the_largest_count():
    """After every step, the pooled spike count equals the window's largest input count."""
    gen = torch.Generator().manual_seed(0)
    op = MaxPool("p", (2, 2), (2, 2), (3, 4, 4), (3, 2, 2))
    counts = torch.zeros(5, 3, 4, 4)
    peak = torch.zeros(5, 3, 2, 2)
    total = torch.zeros(5, 3, 2, 2)
    rates = torch.rand(5, 3, 4, 4, generator=gen)
    for _ in range(40):
        spikes = (torch.rand(5, 3, 4, 4, generator=gen) < rates).float()
        out = _pool_step(op, counts, peak, spikes)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        total += out
        assert torch.equal(total, torch.nn.functional.max_pool2d(counts, 2))


@pytest.mark.parametrize("steps", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_event_driven_and_dense_agree_exactly_on_the_digits_cnn(cnn, cnn_net, steps):
    x = cnn.heldout.inputs[0][:12]
    event = simulate(cnn_net, x, steps, mode="event")
    dense = simulate(cnn_net, x, steps, mode="dense")
    auto = simulate(cnn_net, x, steps, mode="auto", dense_above=0.1)
    for other in (dense, auto):
        assert torch.equal(event.logits, other.logits)
        assert torch.equal(event.sops, other.sops)
        assert event.spikes == other.spikes
    assert event.event_steps == 4 * steps and dense.dense_steps == 4 * steps
    assert event.spikes["conv2"] > 0 and float(event.sops.sum()) > 0


def test_event_driven_and_dense_agree_exactly_on_the_digits_mlp(mlp, mlp_net):
    x = mlp.heldout.inputs[0][:64]
    event = simulate(mlp_net, x, 16, mode="event")
    dense = simulate(mlp_net, x, 16, mode="dense")
    assert torch.equal(event.logits, dense.logits) and torch.equal(event.sops, dense.sops)


def test_sops_stay_below_the_full_fanout(cnn, cnn_net):
    """No step can cost more than every spike-driven input firing (the ANN's dense MACs)."""
    run = simulate(cnn_net, cnn.heldout.inputs[0][:16], 4)
    dense_macs = cnn_net.ann_macs() - cnn_net.input_macs()
    assert float(run.sops.max()) <= dense_macs
    assert float(run.sops.min()) >= 0


def test_early_exit_stops_inputs_and_their_sops(mlp, mlp_net):
    x = mlp.heldout.inputs[0][:10]
    full = simulate(mlp_net, x, 6)
    stop_first_half = torch.arange(10) < 5

    def rule(logits: torch.Tensor, step: int) -> torch.Tensor:
        assert logits.shape == (10, 10)  # nobody has left before step 2
        return stop_first_half if step == 2 else torch.zeros(10, dtype=torch.bool)

    def once(logits: torch.Tensor, step: int) -> torch.Tensor:
        return rule(logits, step) if step <= 2 else torch.zeros(len(logits), dtype=torch.bool)

    run = simulate(mlp_net, x, 6, exit_rule=once)
    assert run.steps.tolist() == [2] * 5 + [6] * 5
    assert torch.equal(run.sops[:2], full.sops[:2])
    assert float(run.sops[2:, :5].abs().sum()) == 0
    assert torch.equal(run.sops[2:, 5:], full.sops[2:, 5:])  # the others run on unchanged
    assert torch.equal(run.final[:5], full.logits[1, :5])
    assert torch.equal(run.final[5:], full.final[5:])


def test_batches_join_into_one_run(mlp, mlp_net):
    x = mlp.heldout.inputs[0][:50]
    whole = simulate(mlp_net, x, 4)
    joined = simulate_batched(mlp_net, x, 4, batch_size=16)
    assert torch.equal(whole.logits, joined.logits) and torch.equal(whole.sops, joined.sops)


def test_bad_arguments_are_refused(mlp_net):
    with pytest.raises(InvalidInput, match="per-sample shape"):
        simulate(mlp_net, torch.zeros(2, 63), 4)
    with pytest.raises(InvalidInput, match="steps"):
        simulate(mlp_net, torch.zeros(2, 64), 0)
    with pytest.raises(InvalidInput, match="mode"):
        simulate(mlp_net, torch.zeros(2, 64), 2, mode="fast")  # type: ignore[arg-type]
