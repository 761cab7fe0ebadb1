"""Export a torch module to a checked ONNX file with a dynamic batch dimension."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from edgeswarm.placement.errors import InvalidInput, ModelFileError

log = logging.getLogger("edgeswarm.models.runtimes")

OPSET = 18


def export_onnx(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                path: Path, input_names: Sequence[str], output_names: Sequence[str],
                free_dims: Mapping[str, Sequence[int]] | None = None) -> Path:
    """Export ``module`` to ``path`` (ONNX opset 18, weights inside the file).

    Dimension 0 of every input is dynamic, plus the dimensions named in ``free_dims``.
    The result is checked with ``onnx.checker``; a failure raises ModelFileError.
    """
    import onnx

    free = free_dims or {}
    shapes = []
    for name, x in zip(input_names, example_inputs, strict=True):
        dims = {0: torch.export.Dim.DYNAMIC}
        dims.update({d: torch.export.Dim.DYNAMIC for d in free.get(name, ())})
        if x.dim() == 0:
            raise InvalidInput(f"input {name!r} is a scalar; inputs must be batch-first")
        shapes.append(dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = module.eval()
    sink = io.StringIO()
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)  # it warns about torchvision ops on every export
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, tuple(example_inputs), str(path),
                              input_names=list(input_names), output_names=list(output_names),
                              dynamo=True, dynamic_shapes=tuple(shapes), opset_version=OPSET,
                              external_data=False, verbose=False)
        except Exception as exc:
            log.debug("exporter output:\n%s", sink.getvalue())
            raise ModelFileError(
                f"could not export {type(module).__name__} to ONNX: {exc}. The module must "
                "be traceable by torch.export with batch-first inputs") from exc
        finally:
            noisy.setLevel(level)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelFileError(f"exported ONNX file {path} fails onnx.checker: {exc}") from exc
    return path
