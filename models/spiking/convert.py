"""ANN -> SNN conversion: integrate-and-fire neurons with thresholds balanced on data.

A trained ReLU network (a chain of ``Linear``/``Conv2d`` layers, optional ``BatchNorm``
after them, ``ReLU``, ``MaxPool2d``, ``Flatten``) becomes a :class:`SpikingNetwork`:

1. BatchNorm is folded into the weights before it; ``Dropout``/``Identity`` are dropped;
   a max-pool or flatten between a layer and its ReLU moves after the ReLU (they commute).
2. Threshold balancing (Diehl et al. 2015; Rueckauer et al. 2017): on calibration data,
   ``scale[l]`` = the ``percentile`` of layer ``l``'s positive ReLU activations; weights
   become ``W * scale[l-1] / scale[l]`` and biases ``b / scale[l]`` so that every neuron
   fires at threshold 1 with rate ``activation / scale[l]`` (clipped at one spike a
   step). The output layer keeps the ANN's logit units.
3. Fixed point: everything is rounded to ``frac_bits`` fractional bits of the threshold.
4. Membranes start at ``v_init`` of the threshold (0.5 makes the firing rate round the
   activation instead of flooring it: Bu et al., ICLR 2022).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeswarm.models.spiking.network import Flatten, MaxPool, Op, Shape, SpikingNetwork, Synapse
from edgeswarm.models.spiking.qcfs import QCFS
from edgeswarm.placement.errors import InvalidInput

log = logging.getLogger("edgeswarm.models.spiking")

#: Default activation percentile for threshold balancing (Rueckauer et al. use 99.9-99.999).
PERCENTILE = 99.9
FRAC_BITS = 16
V_INIT = 0.5
#: Steps for which the default fixed point keeps every potential exact in float32 (longer
#: runs stay exact: the executor switches potentials to float64).
EXACT_STEPS = 64
#: Integer weights stay below this magnitude so that sums stay exact in float64.
_MAX_FIXED = 2.0 ** 31


@dataclass
class _Layer:
    """A weighted layer in float64 while converting."""

    name: str
    kind: Literal["linear", "conv"]
    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


@dataclass(frozen=True)
class _Relu:
    name: str
    #: a QCFS layer's trained clip (the activation its neurons' threshold stands for)
    threshold: float | None = None


@dataclass(frozen=True)
class _Pool:
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, self.kernel, self.stride)


@dataclass(frozen=True)
class _Flat:
    name: str

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


_Item = _Layer | _Relu | _Pool | _Flat


def convert(module: nn.Module, calibration: torch.Tensor, percentile: float = PERCENTILE,
            v_init: float = V_INIT, channelwise: bool = True,
            frac_bits: int | None = None) -> SpikingNetwork:
    """Convert a trained ReLU network to integrate-and-fire neurons.

    ``calibration``: real batch-first inputs (a few hundred) whose activations balance
    the thresholds, one factor per output channel (``channelwise``, as BatchNorm leaves
    channels on very different scales) or per layer. ``frac_bits``: fixed-point precision
    of weights and potentials, in bits below the threshold; by default the most (up to
    16) that keeps every spike-driven current exact in float32. Raises
    :class:`InvalidInput` for layers a spiking network cannot express, naming the layer.
    """
    if not 0 < percentile <= 100:
        raise InvalidInput(f"percentile must be in (0, 100], got {percentile}")
    if not 0 <= v_init < 1:
        raise InvalidInput(f"v_init is a fraction of the threshold in [0, 1), got {v_init}")
    if frac_bits is not None and not 4 <= frac_bits <= 24:
        raise InvalidInput(f"frac_bits must be in [4, 24], got {frac_bits}")
    if calibration.ndim < 2 or len(calibration) == 0 or not calibration.is_floating_point():
        raise InvalidInput("calibration must be a non-empty batch-first float tensor, got "
                           f"{tuple(calibration.shape)} {calibration.dtype}")
    items = _normalize(_chain(module))
    x = calibration.detach().to(torch.float64)
    prefix: list[MaxPool | Flatten] = []
    ops: list[Op] = []
    # the analog input enters the first layer unscaled; scales broadcast like activations
    in_scale = torch.ones((1,) * (calibration.ndim - 1), dtype=torch.float64)
    layers = [i for i, it in enumerate(items) if isinstance(it, _Layer)]
    drive = 0.0
    for i, item in enumerate(items):
        shape = tuple(x.shape[1:])
        if isinstance(item, _Relu):
            continue  # handled with the layer before it
        if isinstance(item, (_Pool, _Flat)):
            x = item(x)
            if isinstance(item, _Flat):
                in_scale = in_scale.expand(shape).flatten()
            routing = _routing(item, shape, tuple(x.shape[1:]))
            (ops if ops else prefix).append(routing)
            continue
        y = item(x)
        last = i == layers[-1]
        relu = items[i + 1] if not last else None
        assert relu is None or isinstance(relu, _Relu)  # _normalize put it there
        if last:
            scale = torch.ones(y.shape[1], dtype=torch.float64)
        elif relu is not None and relu.threshold is not None:
            scale = torch.full((y.shape[1],), relu.threshold, dtype=torch.float64)
        else:
            scale = _scale(torch.relu(y), percentile, channelwise)
        if not ops:  # the first layer: how large its drive gets, in thresholds
            drive = float((y / scale.reshape((-1,) + (1,) * (y.ndim - 2))).abs().max())
        if not last:
            y = torch.relu(y) if relu is None or relu.threshold is None else torch.clamp(
                y, 0.0, relu.threshold)
        ops.append(_balanced(item, in_scale, scale, shape, tuple(y.shape[1:]), not last))
        x, in_scale = y, scale.reshape((-1,) + (1,) * (y.ndim - 2))
    net = _fixed_point(tuple(calibration.shape[1:]), tuple(prefix), ops, frac_bits, v_init,
                       percentile, drive)
    log.info("converted %d layers; scales %s", len(layers),
             ", ".join(f"{s.name}={float(s.scale.mean()):.3g}" for s in net.synapses[:-1]))
    return net


def _scale(act: torch.Tensor, percentile: float, channelwise: bool) -> torch.Tensor:
    """The balancing factor of each output channel (one value for all when not channelwise)."""
    channels = act.shape[1]
    per_channel = act.transpose(0, 1).reshape(channels, -1)
    whole = _percentile(per_channel.reshape(-1), percentile, 1.0)
    if not channelwise:
        return torch.full((channels,), whole, dtype=torch.float64)
    return torch.tensor([_percentile(row, percentile, whole) for row in per_channel],
                        dtype=torch.float64)


def _percentile(values: torch.Tensor, percentile: float, fallback: float) -> float:
    positive = values[values > 0]
    if positive.numel() < 16:
        return fallback  # (nearly) dead: nothing to balance on
    return float(np.percentile(positive.numpy(), percentile))


def _balanced(layer: _Layer, in_scale: torch.Tensor, scale: torch.Tensor, in_shape: Shape,
              out_shape: Shape, spiking: bool) -> Synapse:
    """Weights ``W[o, i] * in_scale[i] / scale[o]``, biases ``b[o] / scale[o]`` (threshold 1)."""
    per_out = (-1,) + (1,) * (layer.weight.ndim - 1)
    weight = layer.weight * in_scale.unsqueeze(0) / scale.reshape(per_out)
    return Synapse(layer.name, layer.kind, weight, layer.bias / scale, in_shape, out_shape,
                   spiking, scale, layer.stride, layer.padding)


def _fixed_point(input_shape: Shape, prefix: tuple[MaxPool | Flatten, ...], ops: list[Op],
                 frac_bits: int | None, v_init: float, percentile: float,
                 drive: float) -> SpikingNetwork:
    """Round to ``frac_bits`` fractional bits, by default the most (up to 16) that keep
    currents and potentials exact in float32 for :data:`EXACT_STEPS` steps."""
    for bits in [frac_bits] if frac_bits is not None else range(FRAC_BITS, 7, -1):
        one = 2.0 ** bits
        fixed = tuple(replace(op, weight=torch.round(op.weight * one),
                              bias=torch.round(op.bias * one))
                      if isinstance(op, Synapse) else op for op in ops)
        net = SpikingNetwork(input_shape, prefix, fixed, bits, v_init, percentile)
        reach = (v_init + EXACT_STEPS * max(drive, 1.0)) * one + EXACT_STEPS * (
            net.largest_membrane_current())
        if net.current_dtype == torch.float32 and reach < 2.0 ** 24:
            break
    else:
        if frac_bits is None:  # float32 cannot be exact: keep full precision in float64
            return _fixed_point(input_shape, prefix, ops, FRAC_BITS, v_init, percentile,
                                drive)
    biggest = max(float(max(s.weight.abs().max(), s.bias.abs().max())) for s in net.synapses)
    if biggest >= _MAX_FIXED:
        raise InvalidInput(f"weights up to {biggest / net.one:.3g} thresholds do not fit "
                           f"{net.frac_bits} fractional bits; pass a lower frac_bits")
    return net


def _routing(item: _Pool | _Flat, in_shape: Shape, out_shape: Shape) -> MaxPool | Flatten:
    if isinstance(item, _Pool):
        return MaxPool(item.name, item.kernel, item.stride, in_shape, out_shape)
    return Flatten(item.name, in_shape, out_shape)


# --- reading the module ---------------------------------------------------------------


def _chain(module: nn.Module) -> list[_Item]:
    """The module as a straight chain of layers, in execution order."""
    if isinstance(module, nn.Sequential):
        out: list[_Item] = []
        for name, child in module.named_children():
            out += [_prefixed(it, name) for it in _chain(child)] if isinstance(
                child, nn.Sequential) else _leaf(name, child)
        return out
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return _leaf(type(module).__name__.lower(), module)
    try:
        graph = module.graph if isinstance(module, fx.GraphModule) else fx.symbolic_trace(
            module).graph
    except Exception as exc:
        raise InvalidInput(f"cannot convert {type(module).__name__} to a spiking network: "
                           f"it is not an nn.Sequential and torch.fx cannot trace it ({exc})"
                           ) from None
    return _from_graph(module, graph)


def _from_graph(module: nn.Module, graph: fx.Graph) -> list[_Item]:
    out: list[_Item] = []
    previous: fx.Node | None = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if previous is not None:
                raise InvalidInput("a spiking network takes one input; this model takes more")
            previous = node
            continue
        if node.op == "output":
            break
        if not node.args or node.args[0] is not previous or any(
                isinstance(a, fx.Node) for a in node.args[1:]):
            raise InvalidInput(f"cannot convert node {node.name!r}: a spiking network must be "
                               "a straight chain of layers (no branches or skip connections)")
        if node.op == "call_module":
            out += _leaf(str(node.target), module.get_submodule(str(node.target)))
        elif node.op == "call_function" and node.target in (torch.relu, F.relu):
            out.append(_Relu(node.name))
        elif node.op == "call_function" and node.target is torch.flatten and _flat_args(node):
            out.append(_Flat(node.name))
        else:
            raise InvalidInput(f"cannot convert node {node.name!r} ({node.op} {node.target}) "
                               "to a spiking network")
        previous = node
    return out


def _flat_args(node: fx.Node) -> bool:
    start, end = node.kwargs.get("start_dim", 1), node.kwargs.get("end_dim", -1)
    return bool(tuple(node.args[1:]) in ((1,), ()) and start == 1 and end == -1)


def _leaf(name: str, m: nn.Module) -> list[_Item]:
    if isinstance(m, nn.Linear):
        bias = _f64(m.bias) if m.bias is not None else torch.zeros(m.out_features,
                                                                    dtype=torch.float64)
        return [_Layer(name, "linear", _f64(m.weight), bias)]
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or m.dilation != (1, 1) or isinstance(m.padding, str) or (
                m.padding_mode != "zeros"):
            raise InvalidInput(f"layer {name!r}: only plain convolutions convert (groups=1, "
                               "dilation=1, numeric zero padding)")
        cbias = _f64(m.bias) if m.bias is not None else torch.zeros(m.out_channels,
                                                                     dtype=torch.float64)
        return [_Layer(name, "conv", _f64(m.weight), cbias, _pair(m.stride),
                       _pair(m.padding))]
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return [_BatchNorm(name, m)]  # type: ignore[list-item]  # folded by _normalize
    if isinstance(m, nn.ReLU):
        return [_Relu(name)]
    if isinstance(m, QCFS):
        return [_Relu(name, float(m.threshold.detach().reshape(-1)[0]))]
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.padding) != (0, 0) or _pair(m.dilation) != (1, 1) or m.ceil_mode:
            raise InvalidInput(f"layer {name!r}: only max-pools without padding, dilation "
                               "or ceil_mode convert")
        stride = m.stride if m.stride is not None else m.kernel_size
        return [_Pool(name, _pair(m.kernel_size), _pair(stride))]
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise InvalidInput(f"layer {name!r}: only Flatten(start_dim=1) converts")
        return [_Flat(name)]
    if isinstance(m, (nn.Dropout, nn.Identity)):
        return []
    raise InvalidInput(f"layer {name!r} ({type(m).__name__}) has no spiking equivalent; "
                       "convertible: Linear, Conv2d, BatchNorm, ReLU, QCFS, MaxPool2d, Flatten")


@dataclass(frozen=True)
class _BatchNorm:
    name: str
    module: nn.Module


def _normalize(items: Sequence[Any]) -> list[_Item]:
    """Fold BatchNorm; put each ReLU right after its layer; check the chain converts."""
    folded: list[_Item] = []
    for it in items:
        if isinstance(it, _BatchNorm):
            if not folded or not isinstance(folded[-1], _Layer):
                raise InvalidInput(f"BatchNorm {it.name!r} does not follow a Linear or Conv2d "
                                   "layer, so it cannot be folded")
            folded[-1] = _fold(folded[-1], it)
        else:
            folded.append(it)
    layers = [i for i, it in enumerate(folded) if isinstance(it, _Layer)]
    if not layers:
        raise InvalidInput("the model has no Linear or Conv2d layer to convert")
    if any(isinstance(it, _Relu) for it in folded[:layers[0]]):
        raise InvalidInput("a ReLU before the first weighted layer cannot convert")
    out: list[_Item] = list(folded[:layers[0]])
    for k, start in enumerate(layers):
        end = layers[k + 1] if k + 1 < len(layers) else len(folded)
        between = folded[start + 1:end]
        relus = [it for it in between if isinstance(it, _Relu)]
        name = folded[start].name
        if k + 1 == len(layers):
            if between:
                raise InvalidInput(f"the last weighted layer {name!r} must produce the output "
                                   f"(logits); it is followed by {between[0].name!r}")
        elif len(relus) != 1:
            raise InvalidInput(f"layer {name!r} must be followed by exactly one ReLU before the "
                               f"next weighted layer (found {len(relus)})")
        out.append(folded[start])
        out += relus
        out += [it for it in between if not isinstance(it, _Relu)]
    return out


def _fold(layer: _Layer, bn: _BatchNorm) -> _Layer:
    m = bn.module
    assert isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
    if m.running_mean is None or m.running_var is None:
        raise InvalidInput(f"BatchNorm {bn.name!r} keeps no running statistics; it cannot fold")
    gamma = _f64(m.weight) if m.weight is not None else torch.ones(m.num_features,
                                                                     dtype=torch.float64)
    beta = _f64(m.bias) if m.bias is not None else torch.zeros(m.num_features,
                                                                dtype=torch.float64)
    factor = gamma / torch.sqrt(_f64(m.running_var) + m.eps)
    shape = (-1,) + (1,) * (layer.weight.ndim - 1)
    return _Layer(layer.name, layer.kind, layer.weight * factor.reshape(shape),
                  (layer.bias - _f64(m.running_mean)) * factor + beta, layer.stride,
                  layer.padding)


def _prefixed(item: _Item, parent: str) -> _Item:
    return replace(item, name=f"{parent}.{item.name}")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).clone()
