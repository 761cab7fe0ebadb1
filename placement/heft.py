"""HEFT (Topcuoglu, Hariri and Wu, 2002): upward rank + insertion-based earliest finish.

Tasks are taken in decreasing upward rank (mean compute over the devices a task may
run on, mean communication by HEFT's average latency and bandwidth); each goes to the
device where it would finish earliest, counting idle gaps between already placed
tasks. Devices whose memory the task would overflow are skipped. The schedule HEFT
builds is exactly the one the simulator predicts for its plan.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgeswarm.placement.cluster import Cluster
from edgeswarm.placement.errors import PlacementInfeasible
from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Group, Problem
from edgeswarm.placement.simulator import ListScheduler, schedule_of
from edgeswarm.placement.taskgraph import TaskGraph


def list_schedule(p: Problem, order: Sequence[int], policy: str) -> tuple[list[Group], Plan]:
    """Earliest-finish-time list scheduling of ``order`` (HEFT's second phase)."""
    ls = ListScheduler(p)
    book = MemoryBook(p)
    for t in order:
        _, best_j = ls.first_finish(t, book.room(t, p.allowed[t]))
        if best_j < 0:
            raise PlacementInfeasible(
                f"task {p.task_ids[t]!r} ({p.param[t]} parameter bytes) fits in the memory "
                f"of none of its devices ({', '.join(p.dev_ids[j] for j in p.allowed[t])}) "
                f"next to the tasks placed before it")
        ls.place(t, (best_j,))
        book.add(t, (best_j,))
    groups = list(ls.groups)
    return groups, p.to_plan(groups, policy, order=order)


def heft_groups(p: Problem) -> list[Group]:
    return list_schedule(p, p.default_order, "heft")[0]


def heft(graph: TaskGraph, cluster: Cluster) -> Plan:
    p = Problem(graph, cluster)
    groups, plan = list_schedule(p, p.default_order, "heft")
    return plan.with_schedule(schedule_of(p, groups, order=p.default_order), simulator_calls=1)


def solve(p: Problem, opts: Options) -> Solution:
    """HEFT as a registered policy (no tensor parallelism, no codecs)."""
    groups, _ = list_schedule(p, p.default_order, "heft")
    return Solution(groups, order=list(p.default_order))
