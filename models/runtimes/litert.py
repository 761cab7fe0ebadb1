"""LiteRT (.tflite) full-integer int8: convert a torch module, run it with the LiteRT interpreter.

Two halves with different dependencies:

- :func:`convert_int8` (workstation side, ``pip install 'edgeswarm[tflite-convert]'``):
  ``torch.export`` → PT2E static quantization with litert-torch's ``PT2EQuantizer``
  (int8 per-channel symmetric weights, int8 per-tensor activations calibrated on real
  data) → ``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))``.
  Operators the quantizer covers (conv, linear, pooling, add, mul, cat) run in int8 and
  the model boundary is int8 too: float inputs and outputs become int8 tensors with a
  scale and zero point. Operators it does not cover (layer norm, softmax, batched
  matmul, embedding) stay float between quantize/dequantize ops. int64 inputs (token
  ids) become int32.
- :class:`LiteRTExecutable` (device side, ``pip install 'edgeswarm[litert]'``): needs only
  ``ai-edge-litert`` and numpy. It quantizes float inputs and dequantizes int8 outputs
  with the boundary tensors' parameters, so callers feed and read float32 as with any
  other runtime.

Batch size: the model is exported with a dynamic batch dimension when litert-torch can
lower it that way. litert-torch 0.10 lowers many ops through JAX, which needs static
shapes (``flatten``/reshape, max pooling, attention's head split); such models get one
signature per batch size in :data:`STATIC_BATCHES` (weights shared) and the executable
cuts a batch into chunks of those sizes. Other dimensions (sequence length) stay static.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeswarm.models.runtimes.base import Executable, as_numpy, check_inputs
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

if TYPE_CHECKING:
    import torch

log = logging.getLogger("edgeswarm.models.runtimes.litert")

DEFAULT_THREADS = 2
#: rows per forward pass while calibrating (dynamic-batch export only)
CALIBRATION_BATCH = 32
#: batch sizes a static-batch model is converted for, one signature each
STATIC_BATCHES = (1, 32)

_CONVERT_HINT = ("pip install 'edgeswarm[tflite-convert]' (heavy: it pulls jax, transformers, "
                 "torchao and the LiteRT converter, about 1 GB; only needed to produce .tflite "
                 "files, not to run them)")


# --------------------------------------------------------------------------- conversion


def convert_int8(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                 calibration: Sequence[torch.Tensor], path: str | Path, *,
                 input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None) -> Path:
    """Convert ``module`` to a full-integer int8 ``.tflite`` file at ``path``.

    ``example_inputs``: one batch-first tensor per model input (batch 1 is fine).
    ``calibration``: the same inputs with many real rows (a few hundred), drawn from the
    training split; activation ranges are observed on them in batches. Names default to
    ``input``/``output`` (``input0``, ``input1``, ... when there are several).
    """
    converter = _import_converter()
    import torch

    example = tuple(example_inputs)
    calib = tuple(calibration)
    _check_calibration(example, calib)
    with torch.no_grad():
        outputs = module.eval()(*example)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    ins = _names(input_names, len(example), "input")
    outs = _names(output_names, n_out, "output")
    named = _named_io(module, ins, outs)
    path = Path(path)
    with _quiet(converter):
        program, dynamic = _export(named, example, ins)
        graph, quantizer = _quantize(program, calib, ins, CALIBRATION_BATCH if dynamic else 1)
        model, dynamic = _lower(converter, graph, quantizer, example, ins, dynamic)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.export(str(path))
    log.info("wrote %s (%d bytes, %s batch)", path, path.stat().st_size,
             "dynamic" if dynamic else "static")
    return path


def _named_io(module: torch.nn.Module, input_names: tuple[str, ...],
              output_names: tuple[str, ...]) -> torch.nn.Module:
    """Wrap ``module`` so the exported signature carries our input and output names.

    litert-torch names the model's inputs after the keyword arguments it traces with and
    its outputs after the keys of a returned dict.
    """
    import torch

    class NamedIO(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = module

        def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> dict[str, Any]:
            values = (*args, *(kwargs[n] for n in input_names[len(args):]))
            out = self.module(*values)
            outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
            return dict(zip(output_names, outs, strict=True))

    # tensor names in the .tflite start with the wrapper's qualified name: keep it short
    NamedIO.__module__, NamedIO.__qualname__ = "edgeswarm", "NamedIO"
    # torch.export binds keyword inputs (and their dynamic shapes) by forward's signature
    param = inspect.Parameter
    NamedIO.forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [param(n, param.POSITIONAL_OR_KEYWORD) for n in ("self", *input_names)])
    return NamedIO().eval()


def _export(module: Any, example: tuple[torch.Tensor, ...],
            names: tuple[str, ...]) -> tuple[torch.export.ExportedProgram, bool]:
    """Export with a dynamic batch dimension if torch can, else with batch 1."""
    import torch

    # An example of batch 1 makes torch.export specialize the dimension; trace with 2 rows.
    doubled = {n: torch.cat([x[:1], x[:1]]) for n, x in zip(names, example, strict=True)}
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.export.export(module, (), doubled,
                                      dynamic_shapes={n: {0: batch} for n in names})
        return program, True
    except Exception as exc:  # torch raises several kinds; the static export below decides
        log.info("no dynamic batch for this module (%s); exporting with batch 1",
                 _first_line(exc))
    try:
        return torch.export.export(module, (), _rows(example, names, 1)), False
    except Exception as exc:
        raise InvalidInput(f"torch.export cannot trace the module ({_first_line(exc)}); "
                           "make forward() free of data-dependent Python control flow, "
                           "or use the onnx-int8 runtime") from exc


def _quantize(program: torch.export.ExportedProgram, calib: tuple[torch.Tensor, ...],
              names: tuple[str, ...], batch: int) -> tuple[Any, Any]:
    """PT2E static int8: insert observers, run the calibration rows, fold to q/dq ops."""
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = program.module()
    _split_call_sites(graph)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    try:
        graph = prepare_pt2e(graph, quantizer)
    except Exception as exc:
        raise InvalidInput(f"the PT2E quantizer rejected the module ({_first_line(exc)}); "
                           "use the onnx-int8 runtime for it") from exc
    rows = int(calib[0].shape[0])
    with torch.no_grad():
        for start in range(0, rows, batch):
            graph(**{n: c[start:start + batch] for n, c in zip(names, calib, strict=True)})
    graph = convert_pt2e(graph, fold_quantize=False)
    move_exported_model_to_eval(graph)
    graph.training = False  # GraphModule.eval() is refused; the flag only silences a warning
    return graph, quantizer


def _lower(converter: Any, graph: Any, quantizer: Any, example: tuple[torch.Tensor, ...],
           names: tuple[str, ...], dynamic: bool) -> tuple[Any, bool]:
    """Lower the quantized graph to a LiteRT model; also say whether its batch is dynamic.

    A dynamic batch is tried first when the export had one. litert-torch lowers many ops
    through JAX, which needs static shapes, so this often fails (flatten, max pooling);
    then the model gets one signature per batch size in :data:`STATIC_BATCHES`, sharing
    the weights.
    """
    import torch
    from litert_torch.quantize.quant_config import QuantConfig

    config = QuantConfig(pt2e_quantizer=quantizer)
    if dynamic:
        batch = torch.export.Dim("batch", min=1)
        try:
            model = converter.convert(graph, sample_kwargs=_rows(example, names, 2),
                                      quant_config=config,
                                      dynamic_shapes={n: {0: batch} for n in names})
            return model, True
        except Exception as exc:  # the lowering raises TypeError, ValueError, ... from jax
            log.info("litert-torch cannot lower a dynamic batch here (%s); using batches %s",
                     _first_line(exc), STATIC_BATCHES)
    # a graph exported with batch 1 cannot be traced again at 32
    errors = []
    for batches in ((STATIC_BATCHES, (1,)) if dynamic else ((1,),)):
        try:
            signatures = converter
            for size in batches:
                key = "serving_default" if size == 1 else f"batch{size}"
                signatures = signatures.signature(
                    key, graph, sample_kwargs=_rows(example, names, size))
            return signatures.convert(quant_config=config), False
        except Exception as exc:
            errors.append(exc)
            log.info("litert-torch cannot lower batches %s (%s)", batches, _first_line(exc))
    raise InvalidInput(f"litert-torch cannot convert the module ({_first_line(errors[-1])}); "
                       "use the onnx-int8 runtime for it") from errors[-1]


def _split_call_sites(graph: Any) -> None:
    """Give each call of a reused submodule its own name for the quantizer.

    Without ``source_fn_stack`` (non-strict export) the annotator groups nodes by module
    name, so one ``nn.MaxPool2d`` called twice becomes one partition and preparation
    fails at random. ``torch.export`` already tells the calls apart in the stack keys
    (``pool``, ``pool@1``); copy that suffix into the name the annotator reads.
    """
    for node in graph.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        for key, (fqn, cls) in list(stack.items()):
            if "@" in key:
                stack[key] = (f"{fqn}@{key.rsplit('@', 1)[1]}", cls)


def _rows(example: tuple[torch.Tensor, ...], names: tuple[str, ...],
          n: int) -> dict[str, torch.Tensor]:
    import torch

    return {name: torch.cat([x[:1]] * n) for name, x in zip(names, example, strict=True)}


def _check_calibration(example: tuple[Any, ...], calib: tuple[Any, ...]) -> None:
    if not example:
        raise InvalidInput("convert_int8 needs example_inputs: one batch-first tensor per input")
    if len(calib) != len(example):
        raise InvalidInput(f"calibration has {len(calib)} tensor(s) but the model takes "
                           f"{len(example)} input(s); pass one batch-first tensor per input")
    rows = {int(c.shape[0]) for c in calib}
    if len(rows) != 1 or 0 in rows:
        raise InvalidInput(f"calibration tensors must share a non-zero batch size, got "
                           f"{sorted(rows)} rows; pass the same samples for every input")
    for i, (c, x) in enumerate(zip(calib, example, strict=True)):
        if tuple(c.shape[1:]) != tuple(x.shape[1:]) or c.dtype != x.dtype:
            raise InvalidInput(f"calibration input {i} is {c.dtype} {tuple(c.shape)} but the "
                               f"example is {x.dtype} {tuple(x.shape)}; they must match "
                               "except for the batch size")


def _names(given: Sequence[str] | None, count: int, stem: str) -> tuple[str, ...]:
    if given is not None:
        names = tuple(given)
        if len(names) != count:
            raise InvalidInput(f"got {len(names)} {stem} name(s) {names} for {count} "
                               f"{stem}(s); pass one name per {stem}")
        bad = [n for n in names if not n.isidentifier() or n == "self"]
        if bad:
            raise InvalidInput(f"{stem} names must be Python identifiers, got {bad}; "
                               "use letters, digits and underscores")
        return names
    return (stem,) if count == 1 else tuple(f"{stem}{i}" for i in range(count))


def _import_converter() -> Any:
    try:
        import litert_torch
    except ImportError as exc:
        raise RuntimeNotAvailable(
            f"converting to tflite-int8 needs litert-torch ({exc}): {_CONVERT_HINT}") from None
    return litert_torch


@contextlib.contextmanager
def _quiet(converter: Any) -> Iterator[None]:
    """Turn off litert-torch's progress printing (an environment variable) for one call."""
    name = "LITERT_TORCH_SHOW_PROGRESS"
    before = os.environ.get(name)
    converter.config.show_progress = False
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class _Port:
    """One input or output tensor of a signature, and how to convert it."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]  # None: a free dimension (always the batch)
    scale: float  # 0.0: not quantized
    zero_point: int

    @property
    def user_dtype(self) -> str:
        """What callers feed or read: float32 for quantized tensors."""
        return "float32" if self.scale else self.dtype.name

    def encode(self, x: np.ndarray) -> np.ndarray:
        info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        if self.scale and info is not None:
            q = np.rint(x.astype(np.float32) / self.scale) + self.zero_point
            return np.clip(q, info.min, info.max).astype(self.dtype)
        if info is not None and x.dtype != self.dtype and x.size and (
                x.min() < info.min or x.max() > info.max):
            raise InvalidInput(f"input {self.name!r} has values outside {self.dtype.name} "
                               f"(the model's input type); pass values in "
                               f"[{info.min}, {info.max}]")
        return x.astype(self.dtype, copy=False)

    def decode(self, y: np.ndarray) -> np.ndarray:
        if self.scale:
            return (y.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        return y


@dataclass(frozen=True)
class _Signature:
    """One entry point of the model: a runner and its tensors in the model's order."""

    key: str
    runner: Any
    batch: int | None  # None: dynamic
    inputs: tuple[_Port, ...]
    outputs: tuple[_Port, ...]

    def __call__(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        feed = {p.name: p.encode(a) for p, a in zip(self.inputs, arrays, strict=True)}
        out = self.runner(**feed)  # resizes and reallocates only when the shapes change
        return [p.decode(out[p.name]) for p in self.outputs]


class LiteRTExecutable(Executable):
    """A ``.tflite`` file run by the LiteRT interpreter (XNNPACK on CPU).

    A model converted with a static batch holds one signature per batch size; a batch is
    cut into chunks of those sizes, the last one padded when that saves calls.
    """

    runtime = "tflite-int8"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        interpreter_cls = _import_interpreter()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"LiteRT model {self.path} does not exist")
        try:
            interpreter = interpreter_cls(model_path=str(self.path),
                                          num_threads=threads or DEFAULT_THREADS)
            signatures = _signatures(interpreter, self.path)
        except (ValueError, RuntimeError) as exc:
            raise ModelFileError(
                f"{self.path} is not a valid LiteRT model ({_first_line(exc)}); expected a "
                ".tflite FlatBuffer, e.g. from 'edgeswarm compile MODEL --runtime tflite-int8 "
                "-o FILE'") from None
        first = signatures[0]
        self.input_names = tuple(p.name for p in first.inputs)
        self.output_names = tuple(p.name for p in first.outputs)
        self._dynamic = next((s for s in signatures if s.batch is None), None)
        self._static = sorted(((s.batch, s) for s in signatures if s.batch is not None),
                              key=lambda entry: entry[0])
        #: batch sizes of a static-batch model, () when the batch dimension is dynamic
        self.batch_sizes = () if self._dynamic else tuple(size for size, _ in self._static)
        self._expected = [(p.name, p.shape, p.user_dtype) for p in first.inputs]

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        arrays = as_numpy(inputs)
        check_inputs(arrays, self._expected)
        rows = {a.shape[0] for a in arrays}
        if len(rows) != 1 or 0 in rows:
            raise InvalidInput(f"inputs must share one non-zero batch size, got {sorted(rows)}")
        if self._dynamic is not None:
            return self._dynamic(arrays)
        n = arrays[0].shape[0]
        size, signature = self._pick(n)
        if size == n:
            return signature(arrays)
        start, parts = 0, []
        while start < n:
            size, signature = self._pick(n - start)
            chunk = [a[start:start + size] for a in arrays]
            take = chunk[0].shape[0]
            if take < size:  # pad by repeating the last row; rows do not interact
                chunk = [np.concatenate([c, np.repeat(c[-1:], size - take, axis=0)])
                         for c in chunk]
            parts.append([y[:take] for y in signature(chunk)])
            start += take
        return [np.concatenate(ys) for ys in zip(*parts, strict=True)]

    def _pick(self, rest: int) -> tuple[int, _Signature]:
        """The batch size and signature for the next chunk of ``rest`` rows."""
        fits = [entry for entry in self._static if entry[0] <= rest]
        holds = [entry for entry in self._static if entry[0] >= rest]
        if holds and (not fits or rest * 8 >= holds[0][0]):
            return holds[0]  # one padded call is cheaper than many small ones
        return fits[-1]


def _import_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise RuntimeNotAvailable(
            f"runtime 'tflite-int8' needs the LiteRT interpreter ({exc}): "
            "pip install 'edgeswarm[litert]'") from None
    return Interpreter


def _signatures(interpreter: Any, path: Path) -> list[_Signature]:
    """The model's signatures, with inputs and outputs in the order of its subgraphs.

    The interpreter lists a signature's tensors by name, sorted; the FlatBuffer's subgraph
    keeps the order of the original function's arguments and results.
    """
    from ai_edge_litert import schema_py_generated as schema

    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model = schema.Model.GetRootAs(buf, 0)
        order = {}
        for i in range(model.SignatureDefsLength()):
            sig = model.SignatureDefs(i)
            graph = model.Subgraphs(sig.SubgraphIndex())
            in_names = {sig.Inputs(j).TensorIndex(): sig.Inputs(j).Name().decode()
                        for j in range(sig.InputsLength())}
            out_names = {sig.Outputs(j).TensorIndex(): sig.Outputs(j).Name().decode()
                         for j in range(sig.OutputsLength())}
            order[sig.SignatureKey().decode()] = (
                [in_names[graph.Inputs(j)] for j in range(graph.InputsLength())],
                [out_names[graph.Outputs(j)] for j in range(graph.OutputsLength())])
    if not order:
        raise ValueError("it has no signature")
    signatures = []
    for key, (ins, outs) in order.items():
        runner = interpreter.get_signature_runner(key)
        in_details, out_details = runner.get_input_details(), runner.get_output_details()
        inputs = tuple(_port(n, in_details[n]) for n in ins)
        batch = int(in_details[ins[0]]["shape_signature"][0])
        signatures.append(_Signature(key, runner, None if batch < 0 else batch, inputs,
                                     tuple(_port(n, out_details[n]) for n in outs)))
    kinds = {tuple((p.name, p.shape, p.user_dtype) for p in s.inputs) for s in signatures}
    if len(kinds) > 1:
        raise ValueError(f"its signatures {list(order)} take different inputs; expected "
                         "batch-size variants of one model")
    return signatures


def _port(name: str, details: dict[str, Any]) -> _Port:
    scale, zero_point = details["quantization"]
    signature = [int(d) for d in details["shape_signature"]]
    # the batch dimension is free either way: dynamic, or run in static-size chunks
    shape = tuple(None if i == 0 or d < 0 else d for i, d in enumerate(signature))
    return _Port(name=name, dtype=np.dtype(details["dtype"]), shape=shape, scale=float(scale),
                 zero_point=int(zero_point))


__all__ = ["DEFAULT_THREADS", "STATIC_BATCHES", "LiteRTExecutable", "convert_int8"]
