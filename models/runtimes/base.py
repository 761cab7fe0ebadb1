"""The runtime interface: an executable compiled for one runtime.

Every runtime takes batch-first inputs (numpy arrays or torch tensors, in the order of
``input_names``) and returns a list of numpy arrays, one per output. Executables are
built by :func:`edgeswarm.models.runtimes.compile` or reloaded from an artifact with
:func:`edgeswarm.models.runtimes.load`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.placement.errors import InvalidInput


class Executable(ABC):
    """A model compiled for one runtime."""

    #: runtime name, e.g. "onnx-int8"
    runtime: str
    #: the artifact on disk, if the runtime has one (None for the torch runtime)
    path: Path | None
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abstractmethod
    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """Run one batch. ``inputs``: one array per model input, batch-first."""

    @property
    def size_bytes(self) -> int:
        """Size of the artifact (or of the parameters, for in-memory runtimes)."""
        if self.path is None:
            raise NotImplementedError
        return self.path.stat().st_size

    def __repr__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"<{type(self).__name__} {self.runtime}{where}>"


def as_numpy(inputs: Sequence[Any]) -> list[np.ndarray]:
    """Inputs as contiguous numpy arrays (torch tensors are detached and moved to CPU)."""
    out = []
    for x in inputs:
        if hasattr(x, "detach"):
            x = x.detach().cpu().numpy()
        out.append(np.ascontiguousarray(np.asarray(x)))
    return out


def check_inputs(inputs: Sequence[Any], expected: Sequence[tuple[str, tuple[Any, ...], str]],
                 ) -> None:
    """Check count, rank, fixed dimensions and dtype kind before a runtime sees the data.

    ``expected``: (name, shape, dtype) per input; a shape entry that is not an int is a
    free dimension. Raises InvalidInput naming the input and what it should be.
    """
    if len(inputs) != len(expected):
        names = ", ".join(n for n, _, _ in expected)
        raise InvalidInput(
            f"model takes {len(expected)} input(s) ({names}), got {len(inputs)}")
    for x, (name, shape, dtype) in zip(inputs, expected, strict=True):
        got = tuple(np.shape(x))
        if len(got) != len(shape) or any(
                isinstance(want, int) and want != have for want, have in zip(shape, got,
                                                                            strict=True)):
            pretty = "(" + ", ".join(str(d) if isinstance(d, int) else "N"
                                     for d in shape) + ")"
            raise InvalidInput(f"input {name!r} has shape {got}, expected {pretty} "
                               "(N: any size)")
        kind = np.asarray(x).dtype.kind if not hasattr(x, "dtype") else _kind(x.dtype)
        want_kind = _kind(dtype)
        if want_kind != kind:
            raise InvalidInput(f"input {name!r} has dtype {x.dtype}, expected {dtype}")


def _kind(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    if "float" in name or "half" in name:
        return "f"
    if "int" in name or "long" in name:
        return "i"
    if "bool" in name:
        return "b"
    return name


def first_line(exc: BaseException) -> str:
    """The first line of an exception message, for one-line errors that name a cause."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
