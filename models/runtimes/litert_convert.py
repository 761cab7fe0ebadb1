"""Convert a torch module to a full-integer LiteRT (.tflite) model (workstation side).

Needs ``pip install 'edgeswarm[tflite-convert]'``. ``torch.export`` → PT2E static
quantization with litert-torch's ``PT2EQuantizer`` (int8 per-channel symmetric weights,
int8 per-tensor activations calibrated on real data) → ``litert_torch.convert(...,
quant_config=QuantConfig(pt2e_quantizer=...))``. Operators the quantizer covers (conv,
linear, pooling, add, mul, cat) run in int8 and the model boundary is int8 too: float
inputs and outputs become int8 tensors with a scale and zero point. Operators it does
not cover (layer norm, softmax, batched matmul, embedding) stay float between
quantize/dequantize ops. int64 inputs (token ids) become int32.

Batch size: the model is exported with a dynamic batch dimension when litert-torch can
lower it that way. litert-torch 0.10 lowers many ops through JAX, which needs static
shapes (``flatten``/reshape, max pooling, attention's head split); such models get one
signature per batch size in :data:`STATIC_BATCHES` (weights shared), and
:class:`~edgeswarm.models.runtimes.litert.LiteRTExecutable` cuts a batch into chunks of
those sizes. Other dimensions (sequence length) stay static.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeswarm.models.runtimes.base import first_line as _first_line
from edgeswarm.placement.errors import InvalidInput, RuntimeNotAvailable

if TYPE_CHECKING:
    import torch

log = logging.getLogger("edgeswarm.models.runtimes.litert")

#: rows per forward pass while calibrating (dynamic-batch export only)
CALIBRATION_BATCH = 32
#: batch sizes a static-batch model is converted for, one signature each
STATIC_BATCHES = (1, 32)

_CONVERT_HINT = ("pip install 'edgeswarm[tflite-convert]' (heavy: it pulls jax, transformers, "
                 "torchao and the LiteRT converter, about 1 GB; only needed to produce .tflite "
                 "files, not to run them)")



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


__all__ = ["STATIC_BATCHES", "convert_int8"]
