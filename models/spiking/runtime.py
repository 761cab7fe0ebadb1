"""The ``snn`` runtime: a converted spiking network behind the :class:`Executable` interface.

``compile(model, runtime="snn")`` converts the model (thresholds balanced on its
calibration data), picks the timesteps and calibrates the early exit on labelled
held-out data (a zoo model's ``heldout``; otherwise the calibration inputs labelled by
the ANN itself), writes an ``.snn`` artifact and returns an :class:`SnnExecutable`.
``run([x])`` returns ``[logits]`` like the ANN; :meth:`SnnExecutable.simulate` also
reports the steps each input took and its synaptic operations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgeswarm.models.runtimes.base import Executable, as_numpy, check_inputs
from edgeswarm.models.spiking import artifact
from edgeswarm.models.spiking.artifact import ConfidenceSpec
from edgeswarm.models.spiking.confidence import calibrate, confidence
from edgeswarm.models.spiking.convert import PERCENTILE, convert
from edgeswarm.models.spiking.executor import (
    ExitRule,
    Mode,
    SpikeRun,
    simulate_batched,
)
from edgeswarm.models.spiking.network import SpikingNetwork
from edgeswarm.placement.errors import InvalidInput

log = logging.getLogger("edgeswarm.models.spiking")

#: Timesteps tried when choosing how long to run.
TIMESTEP_GRID = (1, 2, 4, 8, 16, 32)
#: Accuracy the spiking network may lose against the ANN when the timesteps are chosen.
TOLERANCE = 0.01
#: Further accuracy the early exit may lose (its calibration target).
MAX_LOSS = 0.005
#: Held-out inputs used at most to choose the timesteps and calibrate the early exit.
MAX_HELDOUT = 512


class SnnExecutable(Executable):
    """A spiking network run for ``timesteps`` steps, stopping confident inputs early."""

    runtime = "snn"

    def __init__(self, net: SpikingNetwork, timesteps: int,
                 confidence_spec: ConfidenceSpec | None, path: Path | None = None,
                 input_names: Sequence[str] = ("input",),
                 output_names: Sequence[str] = ("logits",), mode: Mode = "auto") -> None:
        if timesteps < 1:
            raise InvalidInput(f"timesteps must be >= 1, got {timesteps}")
        self.net = net
        self.timesteps = timesteps
        self.confidence = confidence_spec
        self.path = path
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)
        self.mode: Mode = mode
        self._expected = [(self.input_names[0], ("N", *net.input_shape), "float32")]

    @classmethod
    def open(cls, path: str | Path, mode: Mode = "auto") -> SnnExecutable:
        """Reopen an ``.snn`` artifact (:class:`ModelFileError` if corrupt)."""
        p = Path(path)
        net, header = artifact.read(p)
        return cls(net, header.timesteps, header.confidence, p, header.input_names,
                   header.output_names, mode)

    def run(self, inputs: Sequence[Any]) -> list[np.ndarray]:
        """``[logits]`` (float32) of each input at the step it stopped."""
        result = self.simulate(inputs)
        return [result.final.to(torch.float32).numpy()]

    def simulate(self, inputs: Sequence[Any], early_exit: bool = True,
                 steps: int | None = None) -> SpikeRun:
        """Run and report everything: per-step logits, steps taken, SOPs per step."""
        check_inputs(inputs, self._expected)
        x = torch.from_numpy(as_numpy(inputs)[0].astype(np.float32, copy=False))
        rule = self.exit_rule() if early_exit else None
        return simulate_batched(self.net, x, steps or self.timesteps, self.mode, rule)

    def exit_rule(self) -> ExitRule | None:
        """Stop an input once its confidence reaches the calibrated threshold."""
        spec = self.confidence
        if spec is None or spec.threshold > 1.0:  # NEVER
            return None
        threshold, first = spec.threshold, spec.min_steps

        def rule(logits: torch.Tensor, step: int) -> torch.Tensor:
            return (confidence(logits) >= threshold) & (step >= first)
        return rule

    def save(self, path: str | Path) -> Path:
        """Write the ``.snn`` artifact (the suffix is added when missing)."""
        p = Path(path)
        if p.suffix != artifact.SUFFIX:
            p = p.with_name(p.name + artifact.SUFFIX)
        artifact.write(p, self.net, self.timesteps, self.confidence, self.input_names,
                       self.output_names)
        self.path = p
        return p

    @property
    def size_bytes(self) -> int:
        if self.path is not None:
            return self.path.stat().st_size
        return sum(s.weight.numel() * 4 + s.bias.numel() * 4 for s in self.net.synapses)


def compile_snn(module: torch.nn.Module, calibration: Sequence[Any] | None, output: Path | None,
                heldout: tuple[torch.Tensor, torch.Tensor] | None = None,
                input_names: Sequence[str] = ("input",),
                output_names: Sequence[str] = ("logits",), timesteps: int | None = None,
                max_loss: float = MAX_LOSS, tolerance: float = TOLERANCE,
                percentile: float = PERCENTILE,
                reference: torch.nn.Module | None = None) -> SnnExecutable:
    """Convert ``module``, choose its timesteps and early exit, write ``output`` if given.

    ``calibration``: batch-first inputs that balance the thresholds (required).
    ``heldout``: labelled ``(inputs, labels)`` to choose the timesteps (the fewest in
    :data:`TIMESTEP_GRID` within ``tolerance`` of the ANN's accuracy, unless
    ``timesteps`` is given) and to calibrate the confidence threshold for ``max_loss``;
    without it the calibration inputs labelled by the ANN stand in. ``reference``: the
    ANN to measure against when ``module`` is a copy fine-tuned for conversion (QCFS,
    see :mod:`~edgeswarm.models.spiking.tuned`); by default ``module`` itself.
    """
    if not calibration:
        raise InvalidInput("runtime 'snn' needs calibration data (batch-first real samples) "
                           "to balance the thresholds: pass calibration=")
    if len(input_names) != 1:
        raise InvalidInput(f"runtime 'snn' runs single-input models; this one takes "
                           f"{len(input_names)} inputs")
    calib = _tensor(calibration[0])
    net = convert(module, calib, percentile=percentile)
    if heldout is not None and heldout[1] is not None:
        x, labels = _tensor(heldout[0])[:MAX_HELDOUT], heldout[1][:MAX_HELDOUT]
    else:
        x, labels = calib[:MAX_HELDOUT], None
    with torch.inference_mode():
        ann = (reference if reference is not None else module).eval()(x).argmax(-1)
    if labels is None:
        labels = ann  # agreement with the ANN stands in for accuracy
    ann_accuracy = float((ann == labels).double().mean())
    longest = timesteps or TIMESTEP_GRID[-1]
    run = simulate_batched(net, x, longest)
    accuracy = (run.logits.argmax(-1) == labels).double().mean(1)  # after each step
    if timesteps is None:
        timesteps = next((t for t in TIMESTEP_GRID
                          if accuracy[t - 1] >= ann_accuracy - tolerance), longest)
    cal = calibrate(run.logits[:timesteps], max_loss, labels)
    spec = ConfidenceSpec(**asdict(cal))
    log.info("snn: %d steps (accuracy %.4f, ANN %.4f); early exit at confidence %.4f from "
             "step %d: %.2f mean steps, accuracy %.4f", timesteps,
             float(accuracy[timesteps - 1]), ann_accuracy, cal.threshold, cal.min_steps,
             cal.mean_steps, cal.accuracy)
    exe = SnnExecutable(net, timesteps, spec, None, input_names, output_names)
    if output is not None:
        exe.save(output)
    return exe


def _tensor(x: Any) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if not t.is_floating_point():
        raise InvalidInput(f"runtime 'snn' takes float inputs, got {t.dtype}")
    return t.detach().to(torch.float32)
