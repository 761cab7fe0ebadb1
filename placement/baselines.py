"""The simplest baselines: random placement and greedy earliest finish time.

``random`` puts each task on a uniformly drawn device among those it may run on and
that still have room for it; it shows how much any planning is worth. ``greedy`` is
HEFT without its priority phase: tasks in plain topological order, each on the device
where it finishes earliest. Neither forms tensor-parallel groups or uses codecs.
"""

from __future__ import annotations

import numpy as np

from edgeswarm.placement.errors import PlacementInfeasible
from edgeswarm.placement.heft import list_schedule
from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Group, Problem


def no_room(p: Problem, t: int) -> PlacementInfeasible:
    """The error for task ``t`` fitting on none of its devices (as HEFT words it)."""
    return PlacementInfeasible(
        f"task {p.task_ids[t]!r} ({p.param[t]} parameter bytes) fits in the memory of "
        f"none of its devices ({', '.join(p.dev_ids[j] for j in p.allowed[t])}) next to "
        f"the tasks placed before it")


def solve_random(p: Problem, opts: Options) -> Solution:
    """Each task, in topological order, on a random allowed device with room for it."""
    rng = np.random.default_rng(opts.seed)
    book = MemoryBook(p)
    groups: list[Group] = [()] * p.n
    for t in p.topo:
        room = book.room(t, p.allowed[t])
        if not room:
            raise no_room(p, t)
        j = room[int(rng.integers(len(room)))]
        book.add(t, (j,))
        groups[t] = (j,)
    return Solution(groups)


def solve_greedy(p: Problem, opts: Options) -> Solution:
    """Earliest finish time in plain topological order (HEFT without upward rank)."""
    groups, _ = list_schedule(p, p.topo, "greedy")
    return Solution(groups, order=list(p.topo))
