"""Few-step fine-tuning through time: the converted network trained as the SNN it becomes.

QCFS (:mod:`~edgeswarm.models.spiking.qcfs`) makes every activation a multiple of
``λ / L``, but a spiking neuron only reaches that value on average: its input arrives
unevenly over the steps (a neuron that fired on early excitatory spikes cannot take the
spike back when inhibition follows), and over a few steps that error is most of what the
SNN loses. Like IIR-SNN's and hybrid conversion's retraining (Rathi et al., ICLR 2020;
Chowdhury, Rathi and Roy, ECCV 2022), :func:`spiking_logits` runs a QCFS network as the
executor does, step by step, integrate-and-fire neurons included, and
:func:`finetune_through_time` trains it with back-propagation through time; the
threshold's step passes a triangular surrogate gradient (Neftci et al., 2019). The loss
averages the outputs of the second half of the steps, so that early outputs are right
too: that is what lets the dynamic-confidence exit stop inputs early.

Everything mirrors :mod:`~edgeswarm.models.spiking.executor` on the network that
:func:`~edgeswarm.models.spiking.convert` makes of the module: the first weighted layer
sees the analog input, every QCFS is a layer of IF neurons with threshold ``λ``, reset
by subtraction, starting at ``λ / 2``, a max-pool after them passes the growth of its
window's largest spike count, and the output is the running mean of the last layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgeswarm.models.spiking.qcfs import QCFS, leaves
from edgeswarm.placement.errors import InvalidInput


@dataclass(frozen=True)
class ThroughTimeRecipe:
    """How the network is trained through time (every field is part of the cache key)."""

    steps: int
    samples: int  # training inputs seen, drawn once without replacement
    batch_size: int = 32
    lr: float = 5e-4
    seed: int = 0


class _Fire(torch.autograd.Function):
    """Heaviside step of ``(v - λ) / λ``; backward: the triangle ``max(0, 1 - |x|)``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.clamp(1.0 - x.abs(), min=0.0)


def spiking_logits(module: nn.Module, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The output after each step, ``(steps, batch, classes)``, of ``module`` run as an SNN.

    ``module``: a chain (``nn.Sequential``) of Linear/Conv2d, BatchNorm, QCFS, MaxPool2d,
    Flatten layers, every weighted layer but the last followed by a QCFS.
    """
    if steps < 1:
        raise InvalidInput(f"steps must be >= 1, got {steps}")
    batch = x.shape[0]
    a = x
    spiking = False  # False while ``a`` is the analog input's current (the same each step)
    for name, layer in leaves(module):
        if isinstance(layer, QCFS):
            a = _fire(a if spiking else a.unsqueeze(0).expand(steps, *a.shape).reshape(
                steps * batch, *a.shape[1:]), layer.threshold, steps)
            spiking = True
        elif isinstance(layer, nn.MaxPool2d) and spiking:
            a = _pool_counts(a, layer, steps)
        elif isinstance(layer, nn.MaxPool2d | nn.Flatten | nn.Dropout | nn.Identity | nn.Linear
                        | nn.Conv2d | nn.BatchNorm1d | nn.BatchNorm2d):
            if isinstance(layer, nn.MaxPool2d) and _after_weights(module, name):
                raise InvalidInput(f"max-pool {name!r} sits between a layer and its "
                                   "activation; put it after the activation")
            a = layer(a)
        else:
            raise InvalidInput(f"layer {name!r} ({type(layer).__name__}) cannot run through "
                               "time; a QCFS chain has Linear, Conv2d, BatchNorm, QCFS, "
                               "MaxPool2d and Flatten layers")
    if not spiking:
        raise InvalidInput("the network has no QCFS layer: make one with qcfs.with_qcfs")
    out = a.reshape(steps, batch, -1)
    taken = torch.arange(1, steps + 1, dtype=out.dtype).reshape(steps, 1, 1)
    return torch.cumsum(out, 0) / taken  # the output layer accumulates


def finetune_through_time(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                          recipe: ThroughTimeRecipe,
                          prepare: Callable[[torch.Tensor], torch.Tensor] | None = None
                          ) -> None:
    """Train ``module`` (a QCFS chain) in place as the SNN it converts to.

    BatchNorm keeps its running statistics (the SNN folds them); its affine weights, the
    layers' weights and every ``λ`` train, with AdamW and a one-cycle learning rate. Call
    inside :func:`edgeswarm.models.zoo.training.deterministic`.
    """
    if recipe.samples > len(labels) or recipe.samples < recipe.batch_size:
        raise InvalidInput(f"recipe.samples must be in [{recipe.batch_size}, {len(labels)}], "
                           f"got {recipe.samples}")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(recipe.seed))
    batches = order[:recipe.samples].split(recipe.batch_size)
    optimizer = torch.optim.AdamW(module.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr,
                                                   total_steps=len(batches))
    first = recipe.steps // 2
    module.train()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.eval()
    for rows in batches:
        x = inputs[rows] if prepare is None else prepare(inputs[rows])
        logits = spiking_logits(module, x, recipe.steps)[first:]
        loss = F.cross_entropy(logits.flatten(0, 1), labels[rows].repeat(len(logits)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    module.eval()


def _fire(current: torch.Tensor, threshold: torch.Tensor, steps: int) -> torch.Tensor:
    """IF neurons over ``steps`` for currents ``(steps * batch, ...)``: spikes times λ."""
    per_step = current.reshape(steps, -1, *current.shape[1:])
    v = (0.5 * threshold).expand_as(per_step[0])
    out = []
    for t in range(steps):
        v = v + per_step[t]
        spike = _Fire.apply((v - threshold) / threshold)
        v = v - spike * threshold  # reset by subtraction
        out.append(spike * threshold)
    return torch.stack(out).reshape(current.shape)


def _pool_counts(spikes: torch.Tensor, pool: nn.MaxPool2d, steps: int) -> torch.Tensor:
    """A spike whenever the largest spike count of the window grows (the executor's rule)."""
    per_step = spikes.reshape(steps, -1, *spikes.shape[1:])
    counts = torch.cumsum(per_step, 0).flatten(0, 1)
    peaks = F.max_pool2d(counts, pool.kernel_size, pool.stride)
    peaks = peaks.reshape(steps, -1, *peaks.shape[1:])
    grown = torch.diff(peaks, dim=0, prepend=torch.zeros_like(peaks[:1]))
    return grown.flatten(0, 1)


def _after_weights(module: nn.Module, name: str) -> bool:
    """Whether the layer ``name`` follows a weighted layer with no activation between."""
    last: nn.Module | None = None
    for n, layer in leaves(module):
        if n == name:
            return last is not None and not isinstance(last, QCFS)
        if isinstance(layer, nn.Linear | nn.Conv2d | QCFS):
            last = layer
    return False
