"""The ``.snn`` artifact: a safetensors file with a JSON header, never pickle.

Tensors: ``ops.{k}.weight`` and ``ops.{k}.bias`` (int32, fixed point), ``ops.{k}.scale``
(float64, the balancing factors) for every synapse ``k`` of the chain. The safetensors
metadata holds ``format`` (``edgeswarm.snn/1``) and ``header``: JSON validated by
:class:`Header` (shapes of every op, fixed-point bits, initial potential, timesteps and
the calibrated confidence threshold). :func:`read` checks every tensor against the
header and raises :class:`ModelFileError` naming what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeswarm.models.spiking.network import Flatten, MaxPool, Op, SpikingNetwork, Synapse
from edgeswarm.placement.errors import ModelFileError

FORMAT = "edgeswarm.snn/1"
SUFFIX = ".snn"


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class SynapseSpec(_Strict):
    kind: Literal["linear", "conv"]
    name: str
    in_shape: list[int]
    out_shape: list[int]
    spiking: bool
    stride: list[int] = Field(min_length=2, max_length=2)
    padding: list[int] = Field(min_length=2, max_length=2)


class PoolSpec(_Strict):
    kind: Literal["maxpool"]
    name: str
    kernel: list[int] = Field(min_length=2, max_length=2)
    stride: list[int] = Field(min_length=2, max_length=2)
    in_shape: list[int]
    out_shape: list[int]


class FlattenSpec(_Strict):
    kind: Literal["flatten"]
    name: str
    in_shape: list[int]
    out_shape: list[int]


OpSpec = Annotated[SynapseSpec | PoolSpec | FlattenSpec, Field(discriminator="kind")]


class ConfidenceSpec(_Strict):
    """The calibrated early exit (see :mod:`~edgeswarm.models.spiking.confidence`)."""

    threshold: float
    max_loss: float
    disagreement: float
    mean_steps: float
    steps: int
    samples: int
    full_accuracy: float | None = None
    accuracy: float | None = None
    min_steps: int = Field(default=1, ge=1)  # no input stops before this step


class Header(_Strict):
    """What an ``.snn`` file declares besides its tensors."""

    input_shape: list[int]
    frac_bits: int = Field(ge=4, le=24)
    v_init: float = Field(ge=0, lt=1)
    percentile: float
    prefix: list[OpSpec]
    ops: list[OpSpec] = Field(min_length=1)
    timesteps: int = Field(ge=1)
    confidence: ConfidenceSpec | None
    input_names: list[str] = Field(min_length=1, max_length=1)
    output_names: list[str] = Field(min_length=1, max_length=1)


def write(path: Path, net: SpikingNetwork, timesteps: int, confidence: ConfidenceSpec | None,
          input_names: tuple[str, ...], output_names: tuple[str, ...]) -> None:
    """Write ``net`` and its run settings to ``path`` (atomically)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for k, op in enumerate(net.ops):
        if isinstance(op, Synapse):
            tensors[f"ops.{k}.weight"] = op.weight.to(torch.int32).contiguous()
            tensors[f"ops.{k}.bias"] = op.bias.to(torch.int32).contiguous()
            tensors[f"ops.{k}.scale"] = op.scale.to(torch.float64).contiguous()
    header = Header(input_shape=list(net.input_shape), frac_bits=net.frac_bits,
                    v_init=net.v_init, percentile=net.percentile,
                    prefix=[_spec(op) for op in net.prefix], ops=[_spec(op) for op in net.ops],
                    timesteps=timesteps, confidence=confidence,
                    input_names=list(input_names), output_names=list(output_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata={"format": FORMAT,
                                               "header": header.model_dump_json()})
    os.replace(partial, path)


def read(path: Path) -> tuple[SpikingNetwork, Header]:
    """Reopen an ``.snn`` file; :class:`ModelFileError` if it is missing, corrupt or foreign."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelFileError(f"spiking model file {path} does not exist")
    fix = "recompile it with 'edgeswarm compile MODEL --runtime snn -o FILE'"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not a readable safetensors file ({_first(exc)}); "
                             f"{fix}") from None
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not an edgeswarm spiking model (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r}); {fix}")
    try:
        header = Header.model_validate(json.loads(meta.get("header", "")))
    except (ValueError, ValidationError) as exc:
        raise ModelFileError(f"{path} has an invalid header ({_first(exc)}); {fix}") from None
    ops = tuple(_op(spec, k, tensors, path) for k, spec in enumerate(header.ops))
    prefix = tuple(_op(spec, -1, tensors, path) for spec in header.prefix)
    if not isinstance(ops[0], Synapse) or not isinstance(ops[-1], Synapse) or any(
            isinstance(p, Synapse) for p in prefix):
        raise ModelFileError(f"{path}: the chain must start and end with a weighted layer; "
                             f"{fix}")
    net = SpikingNetwork(tuple(header.input_shape), prefix,  # type: ignore[arg-type]
                         ops, header.frac_bits, header.v_init, header.percentile)
    _check_chain(net, path, fix)
    return net, header


def _check_chain(net: SpikingNetwork, path: Path, fix: str) -> None:
    """Every op's input shape is the output shape of the op before it."""
    shape = net.input_shape
    for op in (*net.prefix, *net.ops):
        if op.in_shape != shape:
            raise ModelFileError(f"{path}: layer {op.name!r} takes {op.in_shape} but receives "
                                 f"{shape}; {fix}")
        if isinstance(op, Synapse) and op.kind == "conv":
            kh, kw = op.weight.shape[2:]
            want = (op.weight.shape[0], *(
                (n + 2 * p - k) // s + 1 for n, p, k, s in zip(
                    op.in_shape[1:], op.padding, (kh, kw), op.stride, strict=True)))
            if op.out_shape != want:
                raise ModelFileError(f"{path}: conv {op.name!r} declares output {op.out_shape}"
                                     f", its kernel gives {want}; {fix}")
        shape = op.out_shape


def _spec(op: Op) -> SynapseSpec | PoolSpec | FlattenSpec:
    if isinstance(op, Synapse):
        return SynapseSpec(kind=op.kind, name=op.name, in_shape=list(op.in_shape),
                           out_shape=list(op.out_shape), spiking=op.spiking,
                           stride=list(op.stride), padding=list(op.padding))
    if isinstance(op, MaxPool):
        return PoolSpec(kind="maxpool", name=op.name, kernel=list(op.kernel),
                        stride=list(op.stride), in_shape=list(op.in_shape),
                        out_shape=list(op.out_shape))
    return FlattenSpec(kind="flatten", name=op.name, in_shape=list(op.in_shape),
                       out_shape=list(op.out_shape))


def _op(spec: SynapseSpec | PoolSpec | FlattenSpec, k: int, tensors: dict[str, torch.Tensor],
        path: Path) -> Op:
    if isinstance(spec, PoolSpec):
        return MaxPool(spec.name, _pair(spec.kernel), _pair(spec.stride),
                       tuple(spec.in_shape), tuple(spec.out_shape))
    if isinstance(spec, FlattenSpec):
        return Flatten(spec.name, tuple(spec.in_shape), tuple(spec.out_shape))
    if k < 0:
        raise ModelFileError(f"{path}: a weighted layer in the input prefix")
    out_ch = spec.out_shape[0]
    in_ch = spec.in_shape[0]
    want: dict[str, tuple[torch.dtype, tuple[int, ...] | None]] = {
        "weight": (torch.int32, (out_ch, in_ch) if spec.kind == "linear" else None),
        "bias": (torch.int32, (out_ch,)),
        "scale": (torch.float64, (out_ch,)),
    }
    got: dict[str, torch.Tensor] = {}
    for part, (dtype, shape) in want.items():
        t = tensors.get(f"ops.{k}.{part}")
        if t is None or t.dtype != dtype or (shape is not None and tuple(t.shape) != shape):
            found = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ModelFileError(f"{path}: tensor ops.{k}.{part} of layer {spec.name!r} is "
                                 f"{found}, expected {dtype} {shape or '(O, C, kh, kw)'}")
        got[part] = t
    weight = got["weight"]
    if spec.kind == "conv" and (weight.ndim != 4 or weight.shape[:2] != (out_ch, in_ch)):
        raise ModelFileError(f"{path}: conv weight ops.{k}.weight has shape "
                             f"{tuple(weight.shape)}, expected ({out_ch}, {in_ch}, kh, kw)")
    return Synapse(spec.name, spec.kind, weight.to(torch.float64),
                   got["bias"].to(torch.float64), tuple(spec.in_shape), tuple(spec.out_shape),
                   spec.spiking, got["scale"], _pair(spec.stride), _pair(spec.padding))


def _pair(v: list[int]) -> tuple[int, int]:
    return (v[0], v[1])


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
