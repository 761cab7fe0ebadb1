"""Spiking deployments: a whole model compiled to ``snn``, on the one device placed best.

The ``snn`` runtime runs a whole model on one device (a stage boundary would carry spike
trains): placing it is choosing that device. :func:`place_snn` builds the spiking task
graph of :mod:`edgeswarm.models.spiking.placement` over the devices that list ``snn``
(spiking hardware, ``snn`` first in a profile, costed by its synaptic operations; a CPU
simulating it by its dense steps), lets a policy choose, and returns a plan of the
model's own tasks all on that device, so deployment, prediction and re-planning after a
device is lost work as for any single-device plan.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeswarm.placement.cluster import Cluster as Topology
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan

if TYPE_CHECKING:
    from edgeswarm.cluster import Model
    from edgeswarm.models.spiking.placement import SpikingCost
    from edgeswarm.models.spiking.runtime import SnnExecutable

RUNTIME = "snn"
POLICY = "snn"
#: Inputs of the model's calibration (or example) data run to measure the spiking cost.
COST_SAMPLES = 64


@dataclass(frozen=True)
class Compiled:
    """A model compiled to ``snn`` and what one inference costs, averaged on real inputs."""

    exe: SnnExecutable
    cost: SpikingCost


_lock = threading.Lock()
_compiled: dict[int, tuple[Any, Compiled]] = {}   # id(module) -> (module, compiled)
_dir: list[Path] = []


def compiled(model: Model) -> Compiled:
    """``model`` compiled to ``snn`` once per module in this process. A zoo model converts
    as ``edgeswarm compile NAME --runtime snn`` does (its tuned copy, thresholds checked on
    held-out data); a module from its calibration or example inputs."""
    from edgeswarm.models.runtimes import compile
    from edgeswarm.models.spiking.placement import SpikingCost

    with _lock:
        hit = _compiled.get(id(model.module))
        if hit is not None and hit[0] is model.module:
            return hit[1]
        if not _dir:
            _dir.append(Path(tempfile.mkdtemp(prefix="edgeswarm-snn-")))
        out = _dir[0] / f"{len(_compiled):03d}-{model.name}.snn"
        calibration = model.calibration or model.example_inputs
        if model.zoo:
            exe = compile(model.name, RUNTIME, output=out)
        else:
            exe = compile(model.module, RUNTIME, model.example_inputs,
                          calibration=calibration, output=out)
        samples = [x[:COST_SAMPLES] for x in calibration]
        done = Compiled(exe, SpikingCost.measure(exe, samples))  # type: ignore[arg-type]
        _compiled[id(model.module)] = (model.module, done)
        return done


def place_snn(model: Model, topology: Topology, policy: str = "gnn") -> Plan:
    """Every task of ``model`` on the device the spiking cost model picks."""
    from edgeswarm.models.spiking.placement import TASK, spiking_task_graph
    from edgeswarm.placement.policies import place

    graph = spiking_task_graph(topology, compiled(model).cost, model.name)
    (device,) = place(graph, topology, policy).devices_of(TASK)
    return Plan({t.id: (device,) for t in model.graph.tasks}, policy=POLICY)


def device_of(plan: Plan) -> str:
    """The one device of an ``snn`` plan; InvalidInput naming them for a plan with more."""
    devices = sorted({d for devs in plan.assignments.values() for d in devs})
    if len(devices) != 1:
        raise InvalidInput(f"runtime 'snn' runs a whole model on one device, and the plan "
                           f"uses {len(devices)} ({', '.join(devices)}): plan it with "
                           f"cluster.place(model, runtime='snn')")
    return devices[0]


def seconds_on(topology: Topology, device: str, model: Model) -> float:
    """The modelled seconds of one inference of ``model``'s SNN on ``device``."""
    from edgeswarm.models.spiking.placement import seconds_on as modelled

    (d,) = [x for x in topology.devices if x.id == device]
    return modelled(d, compiled(model).cost)
