"""ONNX Runtime executables (fp32 and int8 share the session code)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.models.runtimes.base import Executable, as_numpy, check_inputs
from edgeswarm.placement.errors import ModelFileError, RuntimeNotAvailable

_ORT_TYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
              "tensor(float16)": "float16", "tensor(uint8)": "uint8", "tensor(int8)": "int8",
              "tensor(bool)": "bool"}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


class OnnxExecutable(Executable):
    """An ONNX file run by ONNX Runtime's CPU provider."""

    def __init__(self, path: Path, runtime: str = "onnx", threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeNotAvailable(
                "runtime 'onnx' needs ONNX Runtime: pip install 'edgeswarm[onnx]'") from None
        self.path = Path(path)
        self.runtime = runtime
        if not self.path.is_file():
            raise ModelFileError(f"ONNX file {self.path} does not exist")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(
                f"{self.path} is not a valid ONNX model ({first}); re-export it with "
                "'edgeswarm compile MODEL --runtime onnx -o FILE'") from None
        ins = self.session.get_inputs()
        self.input_names = tuple(i.name for i in ins)
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._expected = [(i.name, tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in ins]

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        check_inputs(inputs, self._expected)
        arrays = as_numpy(inputs)
        feed = {}
        for (name, _, dtype), x in zip(self._expected, arrays, strict=True):
            feed[name] = x.astype(dtype, copy=False)
        return list(self.session.run(None, feed))
