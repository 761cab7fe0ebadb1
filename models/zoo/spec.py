"""ZooModel: a loaded model with what is needed to export, quantize and score it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

#: How a model's outputs are scored on held-out data.
#: - "accuracy": top-1 of output[0] against integer labels
#: - "cosine": mean cosine similarity of output[0] to the fp32 torch outputs
#: - "top1-agreement": share of positions whose argmax equals the fp32 torch argmax
Metric = Literal["accuracy", "cosine", "top1-agreement"]


@dataclass(frozen=True)
class HeldOut:
    """Held-out real data: inputs (batch-first tensors, one per model input) and labels."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def batch(self, start: int, size: int) -> tuple[torch.Tensor, ...]:
        return tuple(x[start:start + size] for x in self.inputs)


@dataclass(frozen=True)
class ZooModel:
    """A zoo model ready to run: an eval-mode module and the data around it.

    ``example_inputs`` have batch size 1; every input and output is batch-first, so
    exporters mark dimension 0 dynamic. ``calibration`` feeds static int8 quantization;
    it is drawn from the training split, never from ``heldout``.
    """

    name: str
    module: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    heldout: HeldOut
    calibration: tuple[torch.Tensor, ...]
    metric: Metric
    description: str
    #: Figures measured when the model was built (e.g. {"heldout_accuracy": 0.97}).
    reported: dict[str, float] = field(default_factory=dict)
    #: Extra dimensions besides 0 that may vary (e.g. {"input_ids": [1]} for sequence length).
    dynamic_dims: dict[str, tuple[int, ...]] = field(default_factory=dict)
    #: Optional: make a batch of ``n`` inputs for throughput tests (defaults to heldout rows).
    make_batch: Callable[[int], tuple[torch.Tensor, ...]] | None = None
    #: Optional: the onnx-int8 scheme that suits this model ("static", "dynamic" or
    #: "weight-only"); when None, compile() picks static for float inputs, else dynamic.
    int8_scheme: str | None = None

    def batch(self, n: int) -> tuple[torch.Tensor, ...]:
        if self.make_batch is not None:
            return self.make_batch(n)
        rows = len(self.heldout)
        idx = torch.arange(n) % rows
        return tuple(x[idx] for x in self.heldout.inputs)
