"""The registered ``gnn`` policy: the shipped checkpoint driving the move-by-move search.

Importing this module loads the shipped checkpoint and runs the network once on a
two-task problem, so the first plan's decision time does not include reading the
weights or torch's first-call set-up (the registry imports a policy before it starts
the clock). A missing or corrupt checkpoint is reported when :func:`solve` runs.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import ModelFileError
from edgeswarm.placement.gnn.checkpoint import DEFAULT_DIR, load
from edgeswarm.placement.gnn.improve import improve
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId


def solve(p: Problem, opts: Options, checkpoint: Path | str = DEFAULT_DIR) -> Solution:
    """Improve ``opts.start`` (else HEFT's plan) within ``opts.budget_for(p)`` simulator
    calls, greedily by the network's scores; deterministic, never worse than the start.

    Raises :class:`~edgeswarm.placement.errors.ModelFileError` when the checkpoint is
    missing or corrupt."""
    model = load(checkpoint)
    return improve(p, opts, model.net, model.search).solution


def _warm() -> None:
    tasks = (Task(TaskId("a"), 1e9, 0, 1000), Task(TaskId("b"), 1e9, 0, 1000))
    devices = (Device(DeviceId("x"), 1e9, 1 << 30), Device(DeviceId("y"), 2e9, 1 << 30))
    p = Problem(TaskGraph(tasks, (Edge(TaskId("a"), TaskId("b"), 1000),)),
                Cluster(devices, default_link=LinkSpec(1e6, 1e-3)))
    with contextlib.suppress(ModelFileError):  # solve() raises it again, with the fix
        solve(p, Options())


_warm()
