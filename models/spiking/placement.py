"""Spiking devices in plans: an ``snn`` model as one task, costed by how each device runs it.

The ``snn`` runtime runs a whole model on one device (a stage boundary would carry spike
trains, not activations), so placing it is choosing that device: the model becomes a
single task whose ``devices`` are the cluster's devices that list ``snn`` in their
runtimes, and whose ``compute_s`` says what one inference costs on each. Any policy
then places it (``place(graph, cluster)``), trading compute against the links.

A device's ``runtimes`` are in its order of preference (see
:func:`edgeswarm.device_agent.profile.installed_runtimes`). What an inference costs:

- on a device that lists ``snn`` *first*, spiking hardware, work follows the events: the
  first layer's multiply-adds on the analog input once, then one addition per synaptic
  operation (SOP): ``(2 * input_macs + sops) / flops``, its ``flops`` standing for its
  rate of operations;
- on any other device that lists ``snn``, a CPU simulating it, every step is a dense
  product of every spike-driven layer (what the executor's ``auto`` mode runs at the zoo
  models' spike rates): ``2 * (input_macs + steps * (ann_macs - input_macs)) / flops``;
- a measured latency (``seconds``, e.g. the ``dynamic`` ``latency_ms`` of
  ``edgeswarm bench snn --json`` run on that device) replaces either.

Placement never imports this module; it only sees the task graph this builds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeswarm.models.spiking.runtime import SnnExecutable
from edgeswarm.placement.cluster import Cluster, Device
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.taskgraph import Task, TaskGraph, TaskId

RUNTIME = "snn"
#: The id of the one task of a spiking model's task graph.
TASK = TaskId("snn")


@dataclass(frozen=True)
class SpikingCost:
    """What one inference of a compiled spiking model does, on average."""

    input_macs: int  # the first layer's multiply-adds on the analog input
    ann_macs: int  # every layer's, the ANN's cost
    sops: float  # synaptic operations (additions) per inference
    steps: float  # timesteps per inference (fewer than the maximum with early exit)
    param_bytes: int
    out_bytes: int  # of one output row (the logits of one input)

    @classmethod
    def measure(cls, exe: SnnExecutable, inputs: Sequence[Any]) -> SpikingCost:
        """Run ``exe`` (early exit on) on real batch-first ``inputs`` and average."""
        run = exe.simulate(inputs)
        net = exe.net
        return cls(input_macs=net.input_macs(), ann_macs=net.ann_macs(),
                   sops=float(run.sops.sum(0).mean()), steps=float(run.steps.double().mean()),
                   param_bytes=exe.size_bytes, out_bytes=net.output_size * 4)


def prefers_snn(device: Device) -> bool:
    """Whether ``device`` declares spiking hardware: ``snn`` first in its runtimes."""
    runtimes = device.runtimes or ()
    return bool(runtimes) and runtimes[0] == RUNTIME


def runs_snn(device: Device) -> bool:
    return RUNTIME in (device.runtimes or ())


def seconds_on(device: Device, cost: SpikingCost) -> float:
    """The modelled seconds of one inference on ``device`` (see the module's docstring)."""
    if prefers_snn(device):
        return (2.0 * cost.input_macs + cost.sops) / device.flops
    spike_driven = cost.ann_macs - cost.input_macs
    return 2.0 * (cost.input_macs + cost.steps * spike_driven) / device.flops


def spiking_task_graph(cluster: Cluster, cost: SpikingCost, name: str = "",
                       seconds: Mapping[str, float] | None = None) -> TaskGraph:
    """The spiking model as one task that the devices listing ``snn`` may run.

    ``seconds``: measured latencies by device id, used instead of the model. Raises
    :class:`PlacementInfeasible` when no device of ``cluster`` lists ``snn``.
    """
    measured = dict(seconds or {})
    for device, s in measured.items():
        if not s >= 0:
            raise InvalidInput(f"seconds[{device!r}] must be >= 0, got {s}")
    able = [d for d in cluster.devices if runs_snn(d)]
    if not able:
        raise PlacementInfeasible(
            f"no device of the cluster lists runtime {RUNTIME!r} (devices: "
            f"{', '.join(d.id for d in cluster.devices)}); it needs torch and safetensors "
            "on the device")
    task = Task(TASK, flops=2.0 * cost.ann_macs, param_bytes=cost.param_bytes,
                out_bytes=cost.out_bytes, kind="other",
                devices=tuple(d.id for d in able),
                compute_s={d.id: measured.get(d.id, seconds_on(d, cost)) for d in able})
    return TaskGraph((task,), (), name=name)
