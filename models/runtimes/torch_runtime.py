"""The ``torch`` runtime: the fp32 module itself, run eagerly under ``inference_mode``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from edgeswarm.models.runtimes.base import Executable, check_inputs


class TorchExecutable(Executable):
    runtime = "torch"

    def __init__(self, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                 input_names: Sequence[str], output_names: Sequence[str],
                 free_dims: dict[str, tuple[int, ...]] | None = None) -> None:
        self.module = module.eval()
        self.path = None
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        free = free_dims or {}
        self._expected = [
            (name, tuple("N" if d == 0 or d in free.get(name, ()) else int(s)
                         for d, s in enumerate(x.shape)), str(x.dtype))
            for name, x in zip(self.input_names, example_inputs, strict=True)
        ]

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        check_inputs(inputs, self._expected)
        tensors = [x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
                   for x in inputs]
        with torch.inference_mode():
            out = self.module(*tensors)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().cpu().numpy() for o in outs]

    @property
    def size_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters()) + sum(
            b.numel() * b.element_size() for b in self.module.buffers())
