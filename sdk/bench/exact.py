"""A proven lower bound (and often the optimum) by constraint programming: OR-Tools CP-SAT.

:func:`~edgeswarm.placement.bounds.lower_bound` is fast but relaxes device choice per
path: where a task fans out, each successor's floor may assume a different device for
it. On GiPH's grid the true optimum is often 5–15% above it, so a ratio to it mixes the
policy's gap with the bound's. :func:`exact_bound` closes that gap where it can: it
hands the scheduling problem itself to CP-SAT and returns the best bound CP-SAT proves
within a deterministic time budget, and whether that bound is the optimum.

The model is the simulator's problem for single-device plans without codecs, and
looser nowhere: each task runs on one allowed device for its compute time, a device runs
one task at a time, and a task starts once every input has arrived (latency + bytes ÷
bandwidth between different devices, 0 on the same one). Any order on a device is
allowed (the simulator fixes one: that can only be slower), memory is not modelled, and
times are rounded *down* to a grid of 10⁻⁵ of the fast bound, so what CP-SAT proves is
below every plan the simulator accepts. Tensor-parallel groups and codecs are outside
it: do not use it to bound plans that may use them.

It lives with the benchmarks, not in ``placement/``: only the benchmark needs it, and
OR-Tools is an optional dependency (``pip install ortools``; ``placement/`` keeps to
numpy, torch and torch-geometric). :class:`RuntimeNotAvailable` says so when it is
missing.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeswarm.placement.errors import InvalidInput, RuntimeNotAvailable
from edgeswarm.placement.problem import Problem

#: grid of the integer model, as a share of the fast lower bound
RESOLUTION = 1e-5


@dataclass(frozen=True)
class ExactBound:
    #: a makespan no single-device plan without codecs beats (seconds)
    bound: float
    #: CP-SAT proved the bound is the optimum (up to the grid)
    optimal: bool


def exact_bound(p: Problem, floor: float, seconds: float = 5.0, seed: int = 0) -> ExactBound:
    """The best lower bound CP-SAT proves within ``seconds`` of deterministic time (one
    worker: the same answer on every run), never below ``floor`` (the fast bound, which
    also sets the grid)."""
    try:
        from ortools.sat.python import cp_model
    except ImportError as exc:
        raise RuntimeNotAvailable(
            "the exact bound needs OR-Tools: pip install ortools") from exc
    if floor <= 0 or seconds <= 0:
        raise InvalidInput(f"exact_bound: need floor > 0 and seconds > 0, got {floor}, {seconds}")
    unit = floor * RESOLUTION

    def ticks(x: float) -> int:
        return int(x / unit)  # down: the model is never slower than the real problem

    horizon = ticks(sum(max(p.comp[t][j] for j in p.allowed[t]) for t in range(p.n))
                    + sum(max(p.lat[q][j] + b * p.inv_bw[q][j] for q in range(p.m)
                              for j in range(p.m)) for s in range(p.n) for _, b in p.succs[s])) + 1
    m = cp_model.CpModel()
    start = [m.new_int_var(0, horizon, f"s{t}") for t in range(p.n)]
    end = [m.new_int_var(0, horizon, f"e{t}") for t in range(p.n)]
    on: dict[tuple[int, int], cp_model.IntVar] = {}
    per_device: list[list[cp_model.IntervalVar]] = [[] for _ in range(p.m)]
    for t in range(p.n):
        for j in p.allowed[t]:
            on[t, j] = m.new_bool_var(f"on{t}_{j}")
            per_device[j].append(m.new_optional_interval_var(
                start[t], ticks(p.comp[t][j]), end[t], on[t, j], f"run{t}_{j}"))
        m.add_exactly_one(on[t, j] for j in p.allowed[t])
    for runs in per_device:
        if len(runs) > 1:
            m.add_no_overlap(runs)
    for s in range(p.n):
        for t, nbytes in p.succs[s]:
            m.add(start[t] >= end[s])
            for q in p.allowed[s]:
                for j in p.allowed[t]:
                    if q != j:
                        cost = ticks(p.lat[q][j] + nbytes * p.inv_bw[q][j])
                        if cost > 0:
                            m.add(start[t] >= end[s] + cost).only_enforce_if(on[s, q], on[t, j])
    makespan = m.new_int_var(ticks(floor), horizon, "makespan")
    m.add_max_equality(makespan, end)
    m.minimize(makespan)
    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = seconds
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = seed
    status = solver.solve(m)
    if status == cp_model.INFEASIBLE:
        raise InvalidInput("exact_bound: the scheduling model is infeasible (a task with no "
                           "allowed device?)")
    return ExactBound(max(floor, solver.best_objective_bound * unit),
                      status == cp_model.OPTIMAL)
