"""Runtimes: one interface to compile a model for a device and run it.

>>> exe = compile("digits-cnn", runtime="onnx-int8", output=Path("cnn.int8.onnx"))
>>> exe.run([x])[0].shape, exe.size_bytes, exe.runtime

Runtimes: ``torch`` (fp32 eager), ``onnx`` (ONNX Runtime fp32), ``onnx-int8`` (ONNX
Runtime int8: static QDQ calibrated on real data for float-input models, dynamic for
token-input encoders, weight-only blocks for decoder LMs that ask for it),
``tflite-int8`` (full-integer LiteRT model, run by the LiteRT interpreter), ``snn``
(a spiking network converted from a ReLU model, see :mod:`edgeswarm.models.spiking`).
:func:`load` reopens an artifact with only its runtime library.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.models.runtimes.base import Executable
from edgeswarm.models.runtimes.onnx_quant import SCHEMES, Scheme
from edgeswarm.placement.errors import InvalidInput, ModelFileError, UnknownModel

RUNTIMES = ("torch", "onnx", "onnx-int8", "tflite-int8", "snn")
SUFFIX = {"onnx": ".onnx", "onnx-int8": ".onnx", "tflite-int8": ".tflite", "snn": ".snn"}
#: Node types that only an int8 ONNX file has (static QDQ, dynamic, weight-only).
_INT8_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                       "MatMulInteger", "QLinearConv", "QLinearMatMul", "MatMulNBits",
                       "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})


@dataclass
class _Source:
    """What compile() was given, normalized."""

    name: str
    module: Any = None  # torch.nn.Module
    onnx_path: Path | None = None
    example_inputs: tuple[Any, ...] = ()
    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    free_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    calibration: tuple[Any, ...] | None = None
    int8_scheme: str | None = None  # a zoo model's preference
    heldout: tuple[Any, Any] | None = None  # a zoo model's labelled held-out data
    zoo: Any = None  # the ZooModel, when compile() was given a zoo name


def compile(model: Any, runtime: str = "onnx", example_inputs: Sequence[Any] | None = None,
            output: str | Path | None = None, calibration: Sequence[Any] | None = None,
            input_names: Sequence[str] | None = None,
            output_names: Sequence[str] | None = None, int8_scheme: str = "auto",
            threads: int | None = None) -> Executable:
    """Compile ``model`` (a zoo name, an ``nn.Module`` or an ``.onnx`` path) for ``runtime``.

    ``example_inputs`` (batch-first tensors) are required for a module; ``calibration``
    (batch-first, a few hundred real samples) for static int8 of a module or ONNX file;
    zoo models bring both. ``output`` is where the artifact is written (a temporary
    directory if omitted; the runtime's suffix, ``.onnx`` or ``.tflite``, is added when
    missing). ``int8_scheme``: "auto", "static", "dynamic" or "weight-only" (see
    :mod:`~edgeswarm.models.runtimes.onnx_quant`); "auto" takes the zoo model's preference
    if it has one, else static for float inputs and dynamic for token inputs.
    """
    if runtime not in RUNTIMES:
        raise InvalidInput(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}")
    if int8_scheme != "auto":
        _scheme(int8_scheme)  # fail before the export, not after
    src = _resolve(model, example_inputs, calibration, input_names, output_names)
    if output is None:
        suffix = SUFFIX.get(runtime, "")
        output = Path(tempfile.mkdtemp(prefix="edgeswarm-")) / f"{src.name}{suffix}"
    out = Path(output)
    if runtime in SUFFIX and out.suffix != SUFFIX[runtime]:
        out = out.with_name(out.name + SUFFIX[runtime])  # load() goes by the suffix
    if runtime == "torch":
        from edgeswarm.models.runtimes.torch_runtime import TorchExecutable

        if src.module is None:
            raise InvalidInput("runtime 'torch' needs a torch module or zoo name, not an ONNX file")
        return TorchExecutable(src.module, src.example_inputs, src.input_names,
                               src.output_names, src.free_dims)
    if runtime == "tflite-int8":
        return _compile_tflite(src, out, threads)
    if runtime == "snn":
        from edgeswarm.models.spiking.runtime import compile_snn

        if src.module is None:
            raise InvalidInput("runtime 'snn' converts a torch module (or zoo name); an ONNX "
                               "file cannot be converted")
        module = src.module
        if src.zoo is not None:  # some zoo models convert from a copy tuned for few steps
            from edgeswarm.models.spiking.tuned import for_conversion

            module = for_conversion(src.zoo)
        return compile_snn(module, src.calibration, out, src.heldout, src.input_names,
                           src.output_names, reference=src.module)
    return _compile_onnx(src, out, runtime, int8_scheme, threads)


def load(path: str | Path, threads: int | None = None) -> Executable:
    """Reopen a compiled artifact (``.onnx``, ``.tflite`` or ``.snn``) with its runtime."""
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {p} does not exist")
    if p.suffix == ".onnx":
        from edgeswarm.models.runtimes.onnx_runtime import OnnxExecutable

        exe = OnnxExecutable(p, threads=threads)
        exe.runtime = "onnx-int8" if _is_quantized(p) else "onnx"
        return exe
    if p.suffix == ".tflite":
        from edgeswarm.models.runtimes.litert import LiteRTExecutable

        return LiteRTExecutable(p, threads=threads)
    if p.suffix == ".snn":
        from edgeswarm.models.spiking.runtime import SnnExecutable

        return SnnExecutable.open(p)
    raise ModelFileError(f"{p}: unknown artifact type {p.suffix!r}; expected .onnx, .tflite "
                         "or .snn")


def _resolve(model: Any, example_inputs: Sequence[Any] | None, calibration: Sequence[Any] | None,
             input_names: Sequence[str] | None, output_names: Sequence[str] | None) -> _Source:
    from edgeswarm.models import zoo

    if isinstance(model, (str, Path)):
        text = str(model)
        if text in zoo.names():
            z = zoo.load(text)
            return _Source(z.name, z.module, None, z.example_inputs, z.input_names,
                           z.output_names, dict(z.dynamic_dims),
                           tuple(calibration) if calibration is not None else z.calibration,
                           z.int8_scheme, (z.heldout.inputs[0], z.heldout.labels), z)
        path = Path(text)
        if path.suffix == ".onnx" or path.exists():
            if not path.is_file():
                raise ModelFileError(f"ONNX file {path} does not exist")
            if path.suffix != ".onnx":
                raise ModelFileError(f"{path} is not an .onnx file; pass an ONNX model or a "
                                     f"zoo name ({', '.join(zoo.names())})")
            return _Source(path.stem, onnx_path=path,
                           calibration=tuple(calibration) if calibration is not None else None)
        raise UnknownModel(f"unknown model {text!r}: the zoo has {', '.join(zoo.names())}, "
                           "or pass a path to an .onnx file")
    if hasattr(model, "forward") and hasattr(model, "parameters"):
        if example_inputs is None:
            raise InvalidInput("compiling a torch module needs example_inputs "
                               "(a tuple of batch-first tensors)")
        inputs = tuple(example_inputs)
        names = tuple(input_names) if input_names else tuple(f"input{i}" for i in
                                                              range(len(inputs)))
        if len(inputs) == 1 and not input_names:
            names = ("input",)
        outs = tuple(output_names) if output_names else ("output",)
        return _Source(type(model).__name__.lower(), model, None, inputs, names, outs, {},
                       tuple(calibration) if calibration is not None else None)
    raise InvalidInput(f"cannot compile a {type(model).__name__}: pass a zoo name, a torch "
                       "nn.Module or a path to an .onnx file")


def _compile_onnx(src: _Source, out: Path, runtime: str, scheme: str,
                  threads: int | None) -> Executable:
    from edgeswarm.models.runtimes.onnx_runtime import OnnxExecutable

    if src.onnx_path is not None:
        fp32 = src.onnx_path
        OnnxExecutable(fp32)  # a corrupt file fails here, with a clear message
    else:
        from edgeswarm.models.runtimes.onnx_export import export_onnx

        fp32 = out if runtime == "onnx" else out.with_name(out.stem + ".fp32.onnx")
        export_onnx(src.module, src.example_inputs, fp32, src.input_names, src.output_names,
                    src.free_dims)
    if runtime == "onnx":
        if fp32 != out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(fp32.read_bytes())
        return OnnxExecutable(out, "onnx", threads)
    from edgeswarm.models.runtimes.onnx_quant import quantize_onnx

    if scheme != "auto":
        chosen = _scheme(scheme)
    elif src.int8_scheme is not None:
        chosen = _scheme(src.int8_scheme)
    else:
        chosen = "static" if _float_inputs(src, fp32) else "dynamic"
    calib = [np.asarray(_numpy(c)) for c in src.calibration] if src.calibration else None
    quantize_onnx(fp32, out, chosen, calib)
    if src.onnx_path is None:
        fp32.unlink(missing_ok=True)
    return OnnxExecutable(out, "onnx-int8", threads)


def _compile_tflite(src: _Source, out: Path, threads: int | None) -> Executable:
    from edgeswarm.models.runtimes.litert import LiteRTExecutable
    from edgeswarm.models.runtimes.litert_convert import convert_int8

    if src.module is None:
        raise InvalidInput("runtime 'tflite-int8' converts a torch module (or zoo name); "
                           "an ONNX file cannot be converted")
    if not src.calibration:
        raise InvalidInput("runtime 'tflite-int8' needs calibration data (batch-first real "
                           "samples): pass calibration=")
    convert_int8(src.module, src.example_inputs, src.calibration, out,
                 input_names=src.input_names, output_names=src.output_names)
    return LiteRTExecutable(out, threads=threads)


def _scheme(name: str) -> Scheme:
    for scheme in SCHEMES:
        if scheme == name:
            return scheme
    raise InvalidInput(f"unknown int8 scheme {name!r}: use one of auto, {', '.join(SCHEMES)}")


def _float_inputs(src: _Source, fp32: Path) -> bool:
    if src.example_inputs:
        return all(getattr(x, "is_floating_point", lambda: True)() for x in src.example_inputs)
    import onnx

    model = onnx.load(str(fp32), load_external_data=False)
    return all(i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
               for i in model.graph.input)


def _is_quantized(path: Path) -> bool:
    """An int8 op, or a Gather from an 8-bit table (weight-only embeddings)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    int8 = {i.name for i in model.graph.initializer
            if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return any(n.op_type in _INT8_OPS or (n.op_type == "Gather" and n.input[0] in int8)
               for n in model.graph.node)


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


__all__ = ["RUNTIMES", "Executable", "compile", "load"]
