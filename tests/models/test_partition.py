"""Cutting models by plans: the stages compute exactly the whole model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeswarm.models import zoo
from edgeswarm.models.graph import trace
from edgeswarm.models.partition import export, partition
from edgeswarm.models.runtimes import load
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan


def _by_chunks(traced, devices):
    tasks = [t.id for t in traced.graph.tasks]
    k = len(tasks)
    return Plan({t: (devices[min(len(devices) - 1, len(devices) * i // k)],)
                 for i, t in enumerate(tasks)})


class Skip(nn.Module):
    """A residual that skips the middle layers: the carry must take it along."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.d(self.c(torch.relu(self.b(h))) + h), h.sum(dim=1)


def test_stages_are_bitwise_the_model_with_a_skip_and_a_revisited_device():
    torch.manual_seed(0)
    m = Skip().eval()
    x = torch.randn(5, 8)
    tr = trace(m, [x])
    ids = [t.id for t in tr.graph.tasks]
    assert ids == ["input:x", "a", "b", "c", "d"]
    plan = Plan({"input:x": ("p",), "a": ("p",), "b": ("q",), "c": ("q",), "d": ("p",)})
    part = partition(m, [x], plan, tr)
    assert part.devices == ("p", "q", "p")
    assert [s.tasks for s in part.stages] == [("a",), ("b", "c"), ("d",)]
    # h.sum(1), computed on p, is an output: it rides through q untouched
    assert part.stages[1].inputs == ("relu", "sum_1")
    assert part.stages[1].outputs == ("add", "sum_1")
    got = part.run(x)
    with torch.inference_mode():
        ref = m(x)
    assert isinstance(got, tuple) and len(got) == 2
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("name", ["digits-mlp", "digits-cnn"])
def test_zoo_models_split_three_ways_exactly(name):
    z = zoo.load(name)
    tr = trace(z.module, z.example_inputs)
    part = partition(z.module, z.example_inputs, _by_chunks(tr, ["a", "b", "c"]), tr)
    assert part.devices == ("a", "b", "c")
    with torch.inference_mode():
        ref = z.module(*z.example_inputs)
    assert torch.equal(part.run(*z.example_inputs), ref)


@pytest.mark.slow
def test_minilm_split_recomputes_parameter_only_values():
    # token_type_embeddings.weight[0] is computed from parameters alone (no task holds it)
    z = zoo.load("minilm")
    tr = trace(z.module, z.example_inputs)
    part = partition(z.module, z.example_inputs, _by_chunks(tr, ["a", "b", "c"]), tr)
    with torch.inference_mode():
        ref = z.module(*z.example_inputs)
    assert torch.equal(part.run(*z.example_inputs), ref)


def test_one_device_plan_is_one_stage():
    z = zoo.load("digits-mlp")
    tr = trace(z.module, z.example_inputs)
    part = partition(z.module, z.example_inputs, _by_chunks(tr, ["only"]), tr)
    assert len(part.stages) == 1 and part.stages[0].inputs == part.input_names


def test_exported_onnx_stages_chain_to_the_model(tmp_path):
    z = zoo.load("digits-cnn")
    tr = trace(z.module, z.example_inputs)
    part = partition(z.module, z.example_inputs, _by_chunks(tr, ["a", "b"]), tr)
    files = export(part, z.example_inputs, tmp_path, "onnx")
    assert [f.device for f in files] == ["a", "b"] and all(f.size > 0 for f in files)
    assert len({f.sha256 for f in files}) == 2
    values = [t.numpy() for t in z.example_inputs]
    for f in files:
        values = load(f.path).run(values)
    with torch.inference_mode():
        ref = z.module(*z.example_inputs).numpy()
    np.testing.assert_allclose(part.assemble(values), ref, atol=1e-5)


def test_plan_errors_name_the_task():
    z = zoo.load("digits-mlp")
    tr = trace(z.module, z.example_inputs)
    plan = _by_chunks(tr, ["a", "b"])
    missing = Plan({k: v for k, v in plan.assignments.items() if k != tr.graph.tasks[-1].id})
    with pytest.raises(InvalidInput, match=repr(str(tr.graph.tasks[-1].id))):
        partition(z.module, z.example_inputs, missing, tr)
    first = tr.graph.tasks[1].id
    grouped = Plan({**plan.assignments, first: ("a", "b")})
    with pytest.raises(InvalidInput, match="tensor-parallel"):
        partition(z.module, z.example_inputs, grouped, tr)


class SizeAcross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        h = self.a(x)
        n = h.size(1)            # fused into a's task: a Python int
        return self.b(h).reshape(-1, n // 2)


def test_a_cut_a_non_tensor_would_cross_is_refused():
    m = SizeAcross().eval()
    x = torch.randn(2, 6)
    tr = trace(m, [x])
    plan = Plan({t.id: ("p",) if t.id != "b" else ("q",) for t in tr.graph.tasks})
    with pytest.raises(InvalidInput, match="only tensors travel"):
        partition(m, [x], plan, tr)
    together = Plan({t.id: ("p",) for t in tr.graph.tasks})
    assert torch.equal(partition(m, [x], together, tr).run(x), m(x))
