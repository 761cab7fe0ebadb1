"""Run a LiteRT (.tflite) model with the LiteRT interpreter (device side).

Needs only ``pip install 'edgeswarm[litert]'`` (``ai-edge-litert`` and numpy).
:class:`LiteRTExecutable` quantizes float inputs and dequantizes int8 outputs with the
boundary tensors' parameters, so callers feed and read float32 as with any other
runtime. A model converted with one signature per static batch size (see
:mod:`edgeswarm.models.runtimes.litert_convert`) gets a batch cut into chunks of those
sizes. :func:`convert_int8` is re-exported from there for convenience.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.models.runtimes.base import Executable, as_numpy, check_inputs
from edgeswarm.models.runtimes.base import first_line as _first_line
from edgeswarm.models.runtimes.litert_convert import STATIC_BATCHES, convert_int8
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

DEFAULT_THREADS = 2



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
