"""QCFS fine-tuning: teach a ReLU network to be converted for few timesteps.

A converted neuron run for ``T`` steps can only express its activation as a spike count
out of ``T``: a quantization it was never trained for, so a plain conversion needs many
steps before the rounding stops hurting (scene-cnn: 32). QCFS (quantization-clip-floor-
shift; Bu et al., "Optimal ANN-SNN Conversion for High-accuracy and Ultra-low-latency
Spiking Neural Networks", ICLR 2022) replaces every ReLU by

    h(x) = λ * clip(floor(x * L / λ + 1/2) / L, 0, 1)

with a trainable ``λ`` per layer, and fine-tunes the network (the floor passes its
gradient straight through). The network learns to work with ``L`` activation levels;
:func:`~edgeswarm.models.spiking.convert` reads each :class:`QCFS` layer's ``λ`` as the
neuron threshold (instead of an activation percentile), and the half-threshold initial
membrane is the ``+ 1/2`` shift. The SNN then tracks the fine-tuned ANN after about
``L`` steps, where the conversion of the plain ReLU network needed many more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeswarm.placement.errors import InvalidInput

#: Factors of the percentile threshold that :func:`fit_thresholds` tries.
FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0)


class QCFS(nn.Module):
    """The quantized, clipped, shifted ReLU: ``L`` levels between 0 and ``threshold``."""

    start: torch.Tensor

    def __init__(self, levels: int, threshold: float) -> None:
        super().__init__()
        if levels < 1:
            raise InvalidInput(f"QCFS levels must be >= 1, got {levels}")
        if not threshold > 0:
            raise InvalidInput(f"QCFS threshold must be > 0, got {threshold}")
        self.levels = levels
        # λ = start * gain with a trainable gain near 1: the optimizer moves λ in relative
        # steps, however large the layer's activations are
        self.register_buffer("start", torch.tensor([float(threshold)]))
        self.gain = nn.Parameter(torch.ones(1))

    @property
    def threshold(self) -> torch.Tensor:
        """λ: the activation the top level stands for (the neurons' threshold)."""
        return self.start * self.gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lam = self.threshold
        y = torch.clamp(x / lam, 0.0, 1.0)
        # the level each input rounds to, with the identity's gradient (straight through)
        level = torch.floor(y * self.levels + 0.5) / self.levels
        return (y + (level - y).detach()) * lam

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


@dataclass(frozen=True)
class QcfsRecipe:
    """How a network is fine-tuned (every field is part of the fine-tuned weights' key)."""

    levels: int
    epochs: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    #: weight of the SOP penalty (see :func:`finetune`) and the steps it is counted over
    sop_weight: float = 0.0
    steps: int = 8
    #: initial λ of every layer: this percentile of its positive ReLU activations
    percentile: float = 99.9
    seed: int = 0
    threads: int = 1


def with_qcfs(module: nn.Module, calibration: torch.Tensor, levels: int,
              percentile: float = 99.9) -> nn.Sequential:
    """A copy of ``module`` (an ``nn.Sequential``) with every ``nn.ReLU`` replaced by QCFS.

    Each λ starts at the ``percentile`` of the positive activations entering it on
    ``calibration`` (the threshold plain conversion would pick).
    """
    if not isinstance(module, nn.Sequential):
        raise InvalidInput(f"QCFS fine-tuning takes an nn.Sequential, got "
                           f"{type(module).__name__}")
    out = copy.deepcopy(module).eval()
    relus = [(parent, name) for parent in out.modules() if isinstance(parent, nn.Sequential)
             for name, child in parent.named_children() if isinstance(child, nn.ReLU)]
    if not relus:
        raise InvalidInput("the network has no nn.ReLU to replace with QCFS")
    seen: dict[int, torch.Tensor] = {}
    hooks = [getattr(parent, name).register_forward_hook(
        lambda m, _inp, y: seen.__setitem__(id(m), y.detach()))
        for parent, name in relus]
    with torch.inference_mode():
        out(calibration)
    for h in hooks:
        h.remove()
    for parent, name in relus:
        act = seen[id(getattr(parent, name))]
        positive = act[act > 0]
        lam = float(np.percentile(positive.numpy(), percentile)) if positive.numel() else 1.0
        setattr(parent, name, QCFS(levels, lam))
    return out


def fit_thresholds(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                   factors: tuple[float, ...] = FACTORS) -> list[float]:
    """Shrink each QCFS layer's λ, layer by layer, to the factor that scores best.

    With ``L`` levels, the percentile threshold spends most levels on rare large
    activations and rounds the common small ones to zero (scene-cnn at L = 4: 69 % held-out
    accuracy against the ANN's 92 %); a lower λ clips a few and resolves the rest. For
    each layer in order, every factor of :data:`FACTORS` is tried with the layers before
    it fixed, and the one with the best accuracy on ``inputs`` (training data) is kept.
    Returns the chosen factors.
    """
    layers = [m for m in module.modules() if isinstance(m, QCFS)]
    chosen = []
    module.eval()
    with torch.inference_mode():
        for layer in layers:
            start = layer.start.clone()
            scores = []
            for factor in factors:
                layer.start.copy_(start * factor)
                scores.append(float((module(inputs).argmax(-1) == labels).double().mean()))
            best = factors[scores.index(max(scores))]
            layer.start.copy_(start * best)
            chosen.append(best)
    return chosen


def finetune(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             recipe: QcfsRecipe,
             prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Fine-tune a :func:`with_qcfs` network in place (AdamW, one-cycle learning rate).

    The loss is cross-entropy plus ``recipe.sop_weight`` times :func:`sop_rate` times
    ``recipe.steps``: the synaptic operations the SNN will do over its steps, as a share
    of the ANN's multiply-accumulates, so that the network learns to spike less where it
    costs little accuracy. Call inside
    :func:`edgeswarm.models.zoo.training.deterministic`.
    """
    meter = SopMeter(module)
    order = torch.Generator().manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.lr,
                                  weight_decay=recipe.weight_decay)
    batches = [rows for _ in range(recipe.epochs)
               for rows in torch.randperm(len(labels), generator=order).split(recipe.batch_size)]
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr,
                                                   total_steps=len(batches))
    module.train()
    try:
        for rows in batches:
            x = inputs[rows] if prepare is None else prepare(inputs[rows])
            loss = F.cross_entropy(module(x), labels[rows])
            if recipe.sop_weight:
                loss = loss + recipe.sop_weight * recipe.steps * meter.rate()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        meter.close()
        module.eval()


class SopMeter:
    """The SNN's synaptic operations per step, estimated on the QCFS network's last forward.

    A spike-driven layer (every weighted layer after the first) receives spikes at the
    rate ``activation / λ`` of the QCFS before it (after any pooling), and each costs one
    addition per weight: its SOPs per step are the mean rate times its MACs. :meth:`rate`
    is their sum over the ANN's MACs, differentiable in the activations and the λs.
    """

    def __init__(self, module: nn.Module) -> None:
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}
        self._before: list[tuple[nn.Module, QCFS | None]] = []
        last: QCFS | None = None
        for _name, layer in leaves(module):
            if isinstance(layer, QCFS):
                last = layer
            elif isinstance(layer, nn.Linear | nn.Conv2d):
                self._before.append((layer, last))
        if not self._before or self._before[0][1] is not None:
            raise InvalidInput("the network must start with a weighted layer (Linear, Conv2d)")
        self._hooks = [layer.register_forward_hook(self._record) for layer, _ in self._before]

    def _record(self, layer: nn.Module, inputs: tuple[torch.Tensor, ...],
                output: torch.Tensor) -> None:
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        self._seen[id(layer)] = (inputs[0], int(output[0].numel() * weight[0].numel()))

    def rate(self) -> torch.Tensor:
        total = sum(self._seen[id(layer)][1] for layer, _ in self._before)
        sops = sum((self._seen[id(layer)][0] / lam.threshold).mean() * self._seen[id(layer)][1]
                   for layer, lam in self._before if lam is not None)
        return torch.as_tensor(sops) / total

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def leaves(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """The layers of a (nested) ``nn.Sequential`` in order, with their dotted names."""
    if not isinstance(module, nn.Sequential):
        raise InvalidInput(f"a QCFS chain is an nn.Sequential, got {type(module).__name__}")
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            yield from leaves(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child
