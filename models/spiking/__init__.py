"""Spiking runtime: ANN -> SNN conversion, event-driven execution, dynamic-confidence exit.

>>> from edgeswarm.models import zoo
>>> from edgeswarm.models.spiking import convert, simulate
>>> z = zoo.load("digits-cnn")
>>> net = convert(z.module, z.calibration[0])
>>> run = simulate(net, z.heldout.inputs[0][:8], steps=8)
>>> run.final.argmax(-1), run.sops.sum(0)  # predictions and synaptic operations per input

Through the runtime interface: ``compile("digits-cnn", runtime="snn")`` returns an
:class:`SnnExecutable` (artifact ``.snn``, reopened by ``load``). See ``docs/spiking.md``.
"""

from __future__ import annotations

from edgeswarm.models.spiking.confidence import (
    Calibration,
    calibrate,
    confidence,
    exit_predictions,
    exit_steps,
)
from edgeswarm.models.spiking.convert import convert
from edgeswarm.models.spiking.executor import (
    MODES,
    ExitRule,
    Mode,
    SpikeRun,
    simulate,
    simulate_batched,
)
from edgeswarm.models.spiking.network import Flatten, MaxPool, SpikingNetwork, Synapse
from edgeswarm.models.spiking.runtime import SnnExecutable, compile_snn

__all__ = ["MODES", "Calibration", "ExitRule", "Flatten", "MaxPool", "Mode", "SnnExecutable",
           "SpikeRun", "SpikingNetwork", "Synapse", "calibrate", "compile_snn", "confidence",
           "convert", "exit_predictions", "exit_steps", "simulate", "simulate_batched"]
