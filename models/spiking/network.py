"""A converted spiking network: a chain of synaptic layers, IF neurons and routing ops.

Every quantity lives in fixed point, in units of ``2**-frac_bits`` of a neuron's
threshold: weights, biases and membrane potentials are integers (held in float64, which
represents integers up to 2**53 exactly). Sums of integers do not depend on their order,
so the event-driven and the dense executor produce bitwise the same potentials, spikes
and outputs.

The chain reads in execution order:

- ``Synapse`` (``linear`` or ``conv``): a weighted layer. When ``spiking`` it feeds
  integrate-and-fire neurons (threshold ``2**frac_bits``, reset by subtraction); the
  last synapse does not spike, it accumulates the output (logits, in units of
  ``2**-frac_bits``).
- ``MaxPool``: routes, per window, the spikes of the neuron that has fired most so far.
- ``Flatten``: reshapes.

Ops before the first synapse (``prefix``) apply to the analog input. The first synapse
sees the analog input, so its current is computed once per inference (multiply-adds,
counted as ``input_macs``) and injected at every timestep; every later synapse is driven
by spikes (additions only, counted as synaptic operations).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from math import prod
from typing import Literal

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Synapse:
    """A weighted layer in fixed point: ``linear`` (out, in) or ``conv`` (O, C, kh, kw)."""

    name: str
    kind: Literal["linear", "conv"]
    weight: torch.Tensor  # float64, integer-valued
    bias: torch.Tensor  # float64, integer-valued, one per output channel / feature
    in_shape: Shape  # per sample
    out_shape: Shape
    spiking: bool  # False for the output layer, which accumulates instead of firing
    #: per output channel, the activation the neurons' threshold stands for (threshold
    #: balancing factor); ones for the output layer, whose potential is in logit units
    scale: torch.Tensor = field(default_factory=lambda: torch.ones(1, dtype=torch.float64))
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)

    @property
    def fan_in(self) -> int:
        return int(prod(self.weight.shape[1:]))

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one dense evaluation, per sample (the ANN's cost)."""
        return int(prod(self.out_shape)) * self.fan_in


@dataclass(frozen=True)
class MaxPool:
    """Spike-gated max-pooling: each window passes the spikes of its most active neuron."""

    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    in_shape: Shape
    out_shape: Shape


@dataclass(frozen=True)
class Flatten:
    name: str
    in_shape: Shape
    out_shape: Shape


Op = Synapse | MaxPool | Flatten


@dataclass(frozen=True)
class SpikingNetwork:
    """A converted network; build one with :func:`edgeswarm.models.spiking.convert`."""

    input_shape: Shape  # per sample
    prefix: tuple[MaxPool | Flatten, ...]
    ops: tuple[Op, ...]  # starts with the first synapse, ends with the output synapse
    frac_bits: int
    #: initial membrane potential, as a fraction of the threshold (0.5: rates round, not floor)
    v_init: float
    #: activation percentile the thresholds were balanced at
    percentile: float
    _derived: dict[tuple[str, str], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @property
    def one(self) -> float:
        """The threshold in fixed-point units."""
        return float(2 ** self.frac_bits)

    @property
    def synapses(self) -> tuple[Synapse, ...]:
        return tuple(op for op in self.ops if isinstance(op, Synapse))

    @property
    def output_size(self) -> int:
        return int(prod(self.ops[-1].out_shape))

    def ann_macs(self) -> int:
        """Multiply-accumulates of the original ANN per sample."""
        return sum(s.macs for s in self.synapses)

    def input_macs(self) -> int:
        """Multiply-accumulates of the first synapse, run once per inference on the input."""
        return self.synapses[0].macs

    def fanout(self, syn: Synapse) -> torch.Tensor:
        """Synapses leaving each input neuron of ``syn`` (shape ``syn.in_shape``, float64).

        A spike of input neuron ``i`` costs ``fanout[i]`` additions: every output it has a
        weight to, border positions of a padded convolution excluded.
        """
        cached = self._derived.get((syn.name, "fanout"))
        if cached is not None:
            return cached
        if syn.kind == "linear":
            out = torch.full(syn.in_shape, float(syn.weight.shape[0]), dtype=torch.float64)
        else:
            o, _, kh, kw = syn.weight.shape
            c, h, w = syn.in_shape
            # d(sum of outputs)/d(input) counts the outputs each input position reaches
            with torch.inference_mode(False), torch.enable_grad():
                x = torch.zeros(1, 1, h, w, dtype=torch.float64, requires_grad=True)
                kernel = torch.ones(1, 1, kh, kw, dtype=torch.float64)
                torch.nn.functional.conv2d(x, kernel, stride=syn.stride,
                                           padding=syn.padding).sum().backward()
            assert x.grad is not None
            per_pos = x.grad
            out = (per_pos[0, 0] * o).expand(c, h, w).contiguous()
        self._derived[(syn.name, "fanout")] = out
        return out

    def derived(self, syn: Synapse, what: str,
                make: Callable[[Synapse], torch.Tensor]) -> torch.Tensor:
        """``make(syn)``, computed once per network (weight layouts for the executors)."""
        key = (syn.name, what)
        cached = self._derived.get(key)
        if cached is None:
            cached = self._derived[key] = make(syn)
        return cached

    @cached_property
    def current_dtype(self) -> torch.dtype:
        """float32 when every spike-driven current is exact in it, else float64.

        A current is a sum of integer weights picked by binary spikes plus a bias; every
        partial sum of it is bounded by ``sum(|w|) + |b|``, and float32 holds integers
        up to 2**24 exactly, whatever order a kernel adds them in.
        """
        return torch.float32 if self.largest_current() < 2.0 ** 24 else torch.float64

    def largest_current(self) -> float:
        """The largest |current| any spike pattern can drive into a neuron (fixed point)."""
        return max((_largest_current(s) for s in self.synapses[1:]), default=0.0)

    @cached_property
    def _membrane_current(self) -> float:
        return max((_largest_current(s) for s in self.synapses[1:] if s.spiking),
                   default=0.0)

    def largest_membrane_current(self) -> float:
        """:meth:`largest_current` over the spiking layers (the output accumulates apart)."""
        return self._membrane_current


def _largest_current(syn: Synapse) -> float:
    return float((syn.weight.abs().flatten(1).sum(1) + syn.bias.abs()).max())
