"""The policy registry: ``place(graph, cluster, policy=...) -> Plan``.

Every policy is a pure function of a :class:`Problem` and :class:`Options` returning a
:class:`Solution` (placement by index, codecs, optional priority order). This module
wraps it: builds the problem, runs the policy, simulates the result, checks
feasibility and fills in the plan's bookkeeping (policy, simulator calls, decision time
when a clock is passed in).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from edgeswarm.placement.cluster import Cluster
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible, RuntimeNotAvailable
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.problem import Group, Problem
from edgeswarm.placement.simulator import schedule_of
from edgeswarm.placement.taskgraph import TaskGraph


@dataclass
class Solution:
    groups: list[Group]
    codecs: dict[tuple[int, int], str] = field(default_factory=dict)
    order: list[int] | None = None


@dataclass(frozen=True)
class Options:
    #: Simulator calls an improving policy may spend (None: the policy's default, 2|V|).
    budget: int | None = None
    #: May form tensor-parallel groups for splittable tasks.
    tp: bool = True
    #: May put codecs on cut edges.
    codecs: bool = True
    seed: int = 0
    #: Where an improving policy (search, gnn) starts; None: from HEFT's plan.
    start: Solution | None = None

    def budget_for(self, p: Problem) -> int:
        return self.budget if self.budget is not None else 2 * p.n


Policy = Callable[[Problem, Options], Solution]

#: name -> "module:function"; imported on first use so a device that only plans with
#: HEFT never imports torch.
REGISTRY: dict[str, str] = {
    "gnn": "edgeswarm.placement.gnn.policy:solve",
    "heft": "edgeswarm.placement.heft:solve",
    "peft": "edgeswarm.placement.peft:solve",
    "search": "edgeswarm.placement.search:solve",
    "random": "edgeswarm.placement.baselines:solve_random",
    "greedy": "edgeswarm.placement.baselines:solve_greedy",
}

POLICIES = tuple(REGISTRY)


def policy(name: str) -> Policy:
    try:
        target = REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown policy {name!r}; choose one of {', '.join(REGISTRY)}") \
            from None
    module, _, attr = target.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:  # an optional dependency (torch-geometric) is missing
        raise RuntimeNotAvailable(f"policy {name!r} cannot load: no module {exc.name!r}; "
                                  f"install edgeswarm[placement] or choose another policy") \
            from exc
    fn: Policy = getattr(loaded, attr)
    return fn


def solve(p: Problem, name: str, opts: Options | None = None,
          clock: Callable[[], float] | None = None) -> Plan:
    """Run policy ``name`` on a built problem and return its simulated, checked plan."""
    opts = opts or Options()
    fn = policy(name)
    calls0 = p.calls
    t0 = clock() if clock else 0.0
    sol = fn(p, opts)
    decision = (clock() - t0) if clock else 0.0
    calls = p.calls - calls0
    codecs = {k: p.codec_table[v] for k, v in sol.codecs.items() if v != "none"}
    schedule = schedule_of(p, sol.groups, codecs, sol.order)
    p.calls -= 1  # the bookkeeping simulation above is not the policy's
    if not schedule.feasible:
        raise PlacementInfeasible(f"policy {name!r} found no feasible plan: {schedule.reason}")
    plan = p.to_plan(sol.groups, name, sol.codecs, sol.order)
    return plan.with_schedule(schedule, decision_s=decision, simulator_calls=calls)


def place(graph: TaskGraph, cluster: Cluster, policy: str = "heft",
          opts: Options | None = None, clock: Callable[[], float] | None = None) -> Plan:
    """Plan ``graph`` on ``cluster`` with ``policy`` (see :data:`POLICIES`)."""
    return solve(Problem(graph, cluster), policy, opts, clock)
