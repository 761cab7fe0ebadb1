import pytest
import torch
from torch import nn

from edgeswarm.models.graph import extract
from edgeswarm.placement import InvalidInput, TaskGraph


def test_conv_stack_groups_glue_into_layers():
    m = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(32 * 16, 10))
    g = extract(m, (torch.rand(1, 1, 8, 8),))
    assert [t.id for t in g.tasks] == ["input:input", "0", "3", "6"]
    assert [t.kind for t in g.tasks] == ["input", "conv", "conv", "linear"]
    conv1 = g.task("0")
    # conv: 2 * Cin*k*k * output elements, plus ReLU and pooling, one FLOP per element
    assert conv1.flops == 2 * 9 * 16 * 64 + 16 * 64 + 16 * 16
    assert conv1.param_bytes == (16 * 9 + 16) * 4
    assert conv1.out_bytes == 16 * 4 * 4 * 4  # after the fused pooling
    assert g.task("6").param_bytes == (512 * 10 + 10) * 4
    assert {(e.src, e.dst, e.bytes) for e in g.edges} == {
        ("input:input", "0", 256), ("0", "3", 1024), ("3", "6", 2048)}
    assert all(t.splittable for t in g.tasks[1:])


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + torch.relu(self.fc(x)))


def test_residual_input_crosses_once_and_norm_is_not_splittable():
    g = extract(_Residual(), (torch.rand(2, 8),))
    edges = {(e.src, e.dst): e.bytes for e in g.edges}
    assert edges == {("input:x", "fc"): 2 * 8 * 4, ("fc", "norm"): 2 * 8 * 4}
    assert g.task("norm").kind == "norm" and not g.task("norm").splittable


class _Block(nn.Module):
    edgeswarm_kind = "attention"

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ x


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.block = _Block()

    def forward(self, ids):
        h = self.block(self.emb(ids))
        return h @ self.emb.weight.T  # tied output head


def test_declared_blocks_are_one_task_and_tied_weights_count_once():
    g = extract(_Tied(), (torch.tensor([[1, 2, 3]]),))
    assert g.task("block").kind == "attention" and g.task("block").splittable
    assert g.task("block").flops > 2 * 3 * 4 * 4 * 2  # both projections and the products
    assert g.total_param_bytes == sum(p.numel() * 4 for p in _Tied().parameters())
    assert TaskGraph.from_json(g.to_json()) == g


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_module_is_a_clear_error():
    with pytest.raises(InvalidInput, match="cannot trace"):
        extract(_Branchy(), (torch.rand(1, 2),))


def test_wrong_number_of_inputs():
    with pytest.raises(InvalidInput, match="takes 1 input"):
        extract(nn.Linear(2, 2), (torch.rand(1, 2), torch.rand(1, 2)))


def test_batchnorm_after_conv_folds_into_the_conv_task():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    g = extract(m, (torch.rand(1, 3, 8, 8),))
    assert [t.kind for t in g.tasks] == ["input", "conv", "linear"]
    # conv weight + BN weight, bias, running mean and var + the int64 batch counter
    assert g.task("0").param_bytes == (8 * 3 * 9 + 4 * 8) * 4 + 8
