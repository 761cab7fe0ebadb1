"""A model split over two devices with a codec on the cut (no network: bytes in memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeswarm.models import codecs
from edgeswarm.models.codecs.e2e import split_with_codec
from edgeswarm.placement.errors import InvalidInput


def test_with_codec_none_the_split_is_bitwise_the_model(scene):
    x = scene.heldout.inputs[0][:16]
    cs = split_with_codec(scene.module, scene.example_inputs, "conv1", codecs.get("none"))
    assert cs.edge == ("conv1", "conv2") and cs.devices == ("sender", "receiver")
    assert cs.plan.codecs == {}  # fp32 is no codec in a plan
    payload = cs.send(x)
    assert isinstance(payload, bytes) and len(payload) > 16 * 32 * 16 * 16 * 4
    with torch.inference_mode():
        assert torch.equal(cs.receive(payload), scene.module(x))


def test_int8_split_is_close_and_named_in_the_plan(scene):
    x = scene.heldout.inputs[0][:64]
    cs = split_with_codec(scene.module, scene.example_inputs, "conv1", codecs.get("int8"),
                          devices=("pi", "laptop"))
    assert cs.plan.codecs == {("conv1", "conv2"): "int8"}
    assert cs.plan.assignments["conv0"] == ("pi",) and cs.plan.assignments["fc"] == ("laptop",)
    with torch.inference_mode():
        ref = scene.module(x)
    got = cs.run(x)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


class _Skip(nn.Module):
    """a's output skips b: a cut after b carries it beside b's output."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h))) + h[:, :2]


def test_cuts_that_carry_two_activations_or_none_are_refused(scene):
    m = _Skip().eval()
    with pytest.raises(InvalidInput, match="carries 2 activations"):
        split_with_codec(m, [torch.randn(1, 4)], "b", codecs.get("none"))
    with pytest.raises(InvalidInput, match="other than the last"):
        split_with_codec(scene.module, scene.example_inputs, "fc", codecs.get("none"))


@pytest.mark.slow
def test_a_learned_split_uses_its_tuned_tail_and_leaves_the_model_alone(scene, learned):
    before = {k: v.clone() for k, v in scene.module.state_dict().items()}
    cs = split_with_codec(scene.module, scene.example_inputs, learned.split, learned)
    assert cs.plan.codecs == {("conv1", "conv2"): learned.full_name}
    tuned = cs.tail.state_dict()
    assert any(not torch.equal(tuned[k], before[k]) for k in tuned)
    after = scene.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(InvalidInput, match="trained for the cut after 'conv1'"):
        split_with_codec(scene.module, scene.example_inputs, "conv0", learned)
