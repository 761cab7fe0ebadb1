"""``edgeswarm bench placement``: every policy on every suite of generated instances.

Static suites (``giph_grid``, ``headroom``, ``tiny``, ``tp``): each policy plans each
instance from scratch; its makespan is compared to the instance's lower bound, to HEFT's
makespan and (``tiny``) to the exact optimum. On ``giph_grid`` the lower bound is
tightened by CP-SAT (:mod:`edgeswarm.bench.exact`, when OR-Tools is installed):
the bound it proves within ``exact_s`` of deterministic time, and where that is the
optimum, the policies are also compared to it. ``dynamic``: a plan is made on the first
cluster, then after every leave/join event it is re-planned (:func:`replan`) and, for
comparison, planned again from scratch; both are compared and the tasks each moved
counted. Nothing is cached: every figure is measured in the run that prints it.

Decision times are measured on one core (torch limited to one thread), by the clock
passed in. Codecs are off everywhere (they trade accuracy for latency, which a latency
benchmark cannot weigh); tensor parallelism is on only in the ``tp`` suite.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgeswarm.placement import policies
from edgeswarm.placement.errors import (
    Error,
    InvalidInput,
    ModelFileError,
    RuntimeNotAvailable,
)
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.policies import Options
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.replan import replan, tasks_moved

if TYPE_CHECKING:
    from edgeswarm.bench.exact import ExactBound

STATIC_SUITES = ("giph_grid", "headroom", "tiny", "tp", "speed")
SUITES = (*STATIC_SUITES, "dynamic")
#: Policies run on the static suites; ``search20`` is search with a 20|V| budget.
POLICIES = ("gnn", "heft", "peft", "search", "search20", "random", "greedy")
#: Improving policies that re-plan in the dynamic suite (HEFT is planned from scratch
#: at every event as the reference).
DYNAMIC_POLICIES = ("search", "gnn")
#: Suites whose lower bound CP-SAT tightens (single-device plans without codecs).
EXACT_SUITES = ("giph_grid",)
#: CP-SAT's deterministic time per instance, by default.
EXACT_S = 1.0
#: "More than 1% worse than HEFT".
WORSE = 1.01

Progress = Callable[[str], None]
Clock = Callable[[], float]


@dataclass
class _Tally:
    """Per-instance figures of one policy on one suite."""

    ratio_lb: list[float] = field(default_factory=list)
    ratio_heft: list[float] = field(default_factory=list)
    ratio_opt: list[float] = field(default_factory=list)
    decision_ms: list[float] = field(default_factory=list)
    calls: list[float] = field(default_factory=list)
    ratio_scratch: list[float] = field(default_factory=list)
    moved: list[float] = field(default_factory=list)
    scratch_moved: list[float] = field(default_factory=list)
    scratch_decision_ms: list[float] = field(default_factory=list)
    failed: int = 0
    error: str = ""
    unavailable: bool = False

    def fail(self, exc: BaseException) -> None:
        self.failed += 1
        self.error = self.error or f"{type(exc).__name__}: {exc}"

    def summary(self, dynamic: bool) -> dict[str, Any]:
        if not self.ratio_lb:
            return {"error": self.error or "no instance planned", "failed": self.failed}
        out: dict[str, Any] = {
            "mean_ratio_lb": _mean(self.ratio_lb, 4),
            "p90_ratio_lb": _p90(self.ratio_lb),
            "mean_ratio_heft": _mean(self.ratio_heft, 4),
            "worse_than_heft_frac": _mean([float(r > WORSE) for r in self.ratio_heft], 4),
            "mean_decision_ms": _mean(self.decision_ms, 3),
            "mean_simulator_calls": _mean(self.calls, 1),
        }
        if self.ratio_opt:
            out["mean_ratio_opt"] = _mean(self.ratio_opt, 4)
        if dynamic:
            out["events"] = len(self.ratio_lb)
            out["mean_tasks_moved"] = _mean(self.moved, 2)
            if self.ratio_scratch:
                out["mean_ratio_scratch"] = _mean(self.ratio_scratch, 4)
                out["mean_scratch_tasks_moved"] = _mean(self.scratch_moved, 2)
                out["mean_scratch_decision_ms"] = _mean(self.scratch_decision_ms, 3)
        if self.failed:
            out["failed"] = self.failed
            out["error"] = self.error
        return out


def run(suites: Sequence[str] | None = None, instances: int = 100, seed: int = 0,
        progress: Progress | None = None, clock: Clock = time.perf_counter,
        exact_s: float = EXACT_S) -> dict[str, Any]:
    """Measure and return ``{"suites": {suite: {"instances": n, "policies": {...}}}}``.
    ``exact_s`` 0: no CP-SAT bound."""
    from edgeswarm.placement import suites as catalogue

    names = list(suites or SUITES)
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise InvalidInput(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    if instances < 1:
        raise InvalidInput(f"--instances must be at least 1, got {instances}")
    if exact_s < 0:
        raise InvalidInput(f"--exact-s must be >= 0, got {exact_s}")
    threads = _one_thread()
    say = progress or (lambda _msg: None)
    for pol in POLICIES:  # import each policy now, so no decision time includes an import
        try:
            policies.policy("search" if pol == "search20" else pol)
        except Error as exc:
            say(f"{pol}: {exc}")
    out: dict[str, Any] = {}
    for name in names:
        say(f"{name}: generating {instances} instances")
        if name == "dynamic":
            dyn = catalogue.build_dynamic(instances, seed)
            tallies = _dynamic(dyn, seed, say, clock)
            count = len(dyn)
            bound: dict[str, Any] = {}
        else:
            static = catalogue.build(name, instances, seed)
            bound = {"lower_bound": "path, load and deadline load"}
            tallies = _static(name, static, seed, say, clock,
                              exact_s if name in EXACT_SUITES else 0.0, bound)
            count = len(static)
        out[name] = {"instances": count, **bound,
                     "policies": {pol: t.summary(name == "dynamic")
                                  for pol, t in tallies.items()}}
    return {"suites": out, "threads": threads, "seed": seed,
            "budget": "2|V| simulator calls for search and gnn; search20: 20|V|"}


def _static(suite: str, instances: Sequence[Any], seed: int, say: Progress,
            clock: Clock, exact_s: float, bound: dict[str, Any]) -> dict[str, _Tally]:
    """Every policy on every instance. ``bound`` gets how the lower bound was made."""
    from edgeswarm.placement.bounds import lower_bound, optimum

    tp = suite == "tp"
    tallies = {pol: _Tally() for pol in POLICIES}
    proven = 0
    for i, inst in enumerate(instances):
        say(f"{suite}: instance {i + 1}/{len(instances)} ({len(inst.graph.tasks)} tasks, "
            f"{len(inst.cluster.devices)} devices)")
        p = Problem(inst.graph, inst.cluster)
        lb = lower_bound(p, tp=tp, codecs=False)
        opt = optimum(p)[0] if suite == "tiny" else None
        if exact_s > 0:
            e = _exact(p, lb, exact_s, seed + i, say)
            if e is None:
                exact_s = 0.0
                bound["lower_bound"] += " (no CP-SAT: OR-Tools is not installed)"
            else:
                lb, opt = e.bound, e.bound if e.optimal else None
                proven += e.optimal
                bound["lower_bound"] = (f"path, load and deadline load; CP-SAT, {exact_s:g} s "
                                        f"deterministic")
                bound["proven_optimal"] = proven
        spans: dict[str, float] = {}
        for pol in POLICIES:
            plan = _solve(p, pol, Options(tp=tp, codecs=False, seed=seed + i), clock,
                          tallies[pol])
            if plan is None:
                continue
            spans[pol] = plan.predicted_latency_s
            t = tallies[pol]
            t.ratio_lb.append(spans[pol] / lb)
            t.decision_ms.append(plan.decision_s * 1e3)
            t.calls.append(plan.simulator_calls)
            if opt is not None:
                t.ratio_opt.append(spans[pol] / opt)
        if "heft" in spans:
            for pol, span in spans.items():
                tallies[pol].ratio_heft.append(span / spans["heft"])
    return tallies


def _dynamic(instances: Sequence[Any], seed: int, say: Progress,
             clock: Clock) -> dict[str, _Tally]:
    from edgeswarm.placement.bounds import lower_bound

    tallies = {pol: _Tally() for pol in (*DYNAMIC_POLICIES, "heft")}
    for i, inst in enumerate(instances):
        say(f"dynamic: instance {i + 1}/{len(instances)} ({len(inst.graph.tasks)} tasks, "
            f"{len(inst.events)} events)")
        opts = Options(tp=False, codecs=False, seed=seed + i)
        current: dict[str, Plan] = {}
        for pol, t in tallies.items():
            first = _solve(Problem(inst.graph, inst.cluster), pol, opts, clock, t)
            if first is not None:
                current[pol] = first
        before = inst.cluster
        for cluster in inst.events:
            p = Problem(inst.graph, cluster)
            lb = lower_bound(p, tp=False, codecs=False)
            heft = _solve(p, "heft", opts, clock, tallies["heft"])
            for pol, t in tallies.items():
                if pol not in current:
                    continue
                scratch = heft if pol == "heft" else _solve(p, pol, opts, clock, t)
                if scratch is None:
                    continue
                if pol == "heft":
                    new, moved = scratch, tasks_moved(current[pol], scratch)
                else:
                    try:
                        r = replan(current[pol], inst.graph, cluster, pol, opts, clock=clock,
                                   old_cluster=before)
                    except (Error, ImportError, OSError) as exc:
                        t.fail(exc)
                        continue
                    new, moved = r.plan, r.tasks_moved
                    t.ratio_scratch.append(new.predicted_latency_s
                                           / scratch.predicted_latency_s)
                    t.scratch_moved.append(tasks_moved(current[pol], scratch))
                    t.scratch_decision_ms.append(scratch.decision_s * 1e3)
                t.ratio_lb.append(new.predicted_latency_s / lb)
                if heft is not None:
                    t.ratio_heft.append(new.predicted_latency_s / heft.predicted_latency_s)
                t.decision_ms.append(new.decision_s * 1e3)
                t.calls.append(new.simulator_calls)
                t.moved.append(moved)
                current[pol] = new
            before = cluster
    return tallies


def _exact(p: Problem, lb: float, exact_s: float, seed: int,
           say: Progress) -> ExactBound | None:
    """CP-SAT's bound, or None (said once) when OR-Tools is missing."""
    from edgeswarm.bench.exact import exact_bound

    try:
        return exact_bound(p, lb, exact_s, seed)
    except RuntimeNotAvailable as exc:
        say(str(exc))
        return None


def _solve(p: Problem, pol: str, opts: Options, clock: Clock, tally: _Tally) -> Plan | None:
    """One policy on one problem; a failure is tallied, not raised."""
    if tally.unavailable:  # its module or checkpoint is missing: do not retry every time
        tally.failed += 1
        return None
    name, budget = ("search", 20 * p.n) if pol == "search20" else (pol, opts.budget)
    opts = Options(budget=budget, tp=opts.tp, codecs=opts.codecs, seed=opts.seed)
    try:
        return policies.solve(p, name, opts, clock=clock)
    except (RuntimeNotAvailable, ModelFileError, ImportError, OSError) as exc:
        tally.fail(exc)
        tally.unavailable = True
    except Error as exc:
        tally.fail(exc)
    return None


def _one_thread() -> int:
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)
    return 1


def _mean(xs: Sequence[float], digits: int) -> float:
    return round(math.fsum(xs) / len(xs), digits) if xs else float("nan")


def _p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    k = max(0, math.ceil(0.9 * len(s)) - 1)  # nearest-rank percentile
    return round(s[k], 4)
