"""Search: simulated annealing over moves, within a budget of simulator calls.

The search-based baseline the GNN policy is compared against. It starts from a plan
(``Options.start``, else HEFT's) and improves it move by move (see
:mod:`edgeswarm.placement.moves`: relocate a task, grow or shrink the tensor-parallel
group of a splittable task, switch the codec of a cut edge). Every simulated plan costs
one simulator call and the search never spends more than its budget.

A step picks a *focus* task — usually one on the critical path of the current
schedule, sometimes any task — and lists the moves that touch it. Each is scored
without a simulator call by what it does locally: when the focus task would finish
given everything scheduled before it, and when its outputs would reach its successors.
The best-scored move is simulated with probability ``greed``, else the next best, and
so on; moves that break memory or device constraints, and plans already simulated,
are skipped for free. The simulated plan is accepted by the Metropolis rule with a
temperature falling geometrically over the budget; the best plan seen is returned, so
the result is never worse than the start. Deterministic for a seed.

Tasks keep the start's priority order (or the default one), so the returned
solution's simulated makespan is exactly the one the search saw.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.moves import State, moves
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Group, Problem
from edgeswarm.placement.simulator import (
    Codecs,
    ListScheduler,
    Timeline,
    arrival,
    evaluate,
    violation,
)

log = logging.getLogger("edgeswarm.placement.search")

Key = tuple[tuple[Group, ...], tuple[tuple[tuple[int, int], str], ...]]


@dataclass(frozen=True)
class Annealing:
    """How the search spends its budget (the defaults suit budgets of 2–50 × |V|)."""

    #: Starting temperature per simulator call and task of the budget, as a fraction
    #: of the start's makespan: a budget of k·|V| calls starts at ``heat`` × k and
    #: cools geometrically to ``t_end``. A move that makes the plan worse by Δ is
    #: accepted with probability exp(-Δ / T): a large budget can afford to wander.
    heat: float = 0.1
    t_end: float = 0.001
    #: Chance that the focus task is drawn from the critical path (else from all tasks).
    critical: float = 0.8
    #: Chance of simulating the best-scored untried move of the focus task; failing
    #: that, the next best with the same chance, and so on.
    greed: float = 0.9
    #: Go back to the best plan after this share of the budget without improving it.
    patience: float = 0.5

    def __post_init__(self) -> None:
        if not (self.heat > 0 and self.t_end > 0 and 0 <= self.critical <= 1
                and 0 < self.greed <= 1 and self.patience > 0):
            raise InvalidInput(f"search: bad annealing settings {self}")


def solve(p: Problem, opts: Options) -> Solution:
    """The search policy: anneal from ``opts.start`` (else HEFT) within ``opts.budget``."""
    budget = opts.budget_for(p)
    if budget < 0:
        raise InvalidInput(f"search: budget {budget} must be >= 0 simulator calls")
    start = opts.start
    if start is not None:
        if len(start.groups) != p.n:
            raise InvalidInput(f"search: the start places {len(start.groups)} tasks; the "
                               f"graph has {p.n}")
        reason = violation(p, start.groups)
        if reason:
            log.debug("search: start plan infeasible (%s); starting from HEFT", reason)
            start = None
    if start is None:
        start = Solution(heft_groups(p))
    if budget == 0:
        return Solution(list(start.groups), dict(start.codecs),
                        list(start.order) if start.order is not None else None)
    order = list(start.order) if start.order is not None else None
    best = anneal(p, State(list(start.groups), dict(start.codecs)), budget,
                  np.random.default_rng(opts.seed), order=order, tp=opts.tp,
                  codecs=opts.codecs)
    return Solution(best.groups, best.codecs, order)


def anneal(p: Problem, start: State, budget: int, rng: np.random.Generator,
           order: Sequence[int] | None = None, tp: bool = True, codecs: bool = True,
           cfg: Annealing | None = None) -> State:
    """The best state found from feasible ``start`` in at most ``budget`` simulator calls."""
    cfg = cfg or Annealing()
    if budget < 1:
        return start
    calls0 = p.calls
    seq = list(order) if order is not None else list(p.default_order)
    pos = [0] * p.n
    for i, t in enumerate(seq):
        pos[t] = i
    seen: set[Key] = set()

    def simulate(s: State) -> Timeline:
        seen.add(key(s))
        return evaluate(p, s.groups, specs(p, s.codecs), seq)

    cur, cur_tl = start, simulate(start)
    best, best_tl = cur, cur_tl
    scale = cur_tl.makespan if cur_tl.makespan > 0 else 1.0
    crit = critical_tasks(p, cur.groups, specs(p, cur.codecs), cur_tl)
    patience = max(5, int(cfg.patience * budget))
    t_start = max(cfg.t_end, cfg.heat * budget / max(p.n, 1))
    stale = misses = 0
    while p.calls - calls0 < budget and misses < 10 * p.n + 50:
        if crit and rng.random() < cfg.critical:
            focus = crit[int(rng.integers(len(crit)))]
        else:
            focus = int(rng.integers(p.n))
        cand = _propose(p, cur, cur_tl, focus, pos, rng, tp, codecs, seen, cfg.greed)
        if cand is None:  # every move around the focus tried or infeasible
            misses += 1
            continue
        misses = 0
        tl = simulate(cand)
        frac = (p.calls - calls0) / budget
        temp = scale * t_start * (cfg.t_end / t_start) ** frac
        delta = tl.makespan - cur_tl.makespan
        if delta <= 0 or rng.random() < math.exp(-delta / temp):
            cur, cur_tl = cand, tl
            crit = critical_tasks(p, cur.groups, specs(p, cur.codecs), cur_tl)
        if tl.makespan < best_tl.makespan:
            best, best_tl, stale = cand, tl, 0
        else:
            stale += 1
            if stale >= patience and cur is not best:
                cur, cur_tl, stale = best, best_tl, 0
                crit = critical_tasks(p, cur.groups, specs(p, cur.codecs), cur_tl)
    return best


# -- plans as the simulator takes them ------------------------------------------------

def specs(p: Problem, names: Mapping[tuple[int, int], str]) -> Codecs:
    return {e: p.codec_table[name] for e, name in names.items() if name != "none"}


def key(s: State) -> Key:
    return tuple(s.groups), tuple(sorted(s.codecs.items()))


def _tidy(p: Problem, s: State, task: int) -> State:
    """Drop codecs that a move of ``task`` left on internal edges (both ends on one
    device), so that plans differing only there are one plan."""
    for e in _incident(p, task):
        if e in s.codecs and set(s.groups[e[1]]) <= set(s.groups[e[0]]):
            del s.codecs[e]
    return s


def _incident(p: Problem, t: int) -> list[tuple[int, int]]:
    return [(a, t) for a, _ in p.preds[t]] + [(t, d) for d, _ in p.succs[t]]


# -- reading a schedule ----------------------------------------------------------------


def critical_tasks(p: Problem, groups: Sequence[Group], codecs: Codecs,
                   tl: Timeline) -> list[int]:
    """Tasks on a critical path of ``tl``: a chain of tasks, each starting the moment an
    input arrives or its device frees up, that ends at the makespan."""
    if p.n == 0:
        return []
    eps = 1e-9 * max(tl.makespan, 1e-12)
    ends_on: list[list[tuple[float, int]]] = [[] for _ in range(p.m)]
    for u, g in enumerate(groups):
        for j in g:
            ends_on[j].append((tl.end[u], u))
    for lst in ends_on:
        lst.sort()
    todo = [t for t in range(p.n) if tl.end[t] >= tl.makespan - eps]
    found = set(todo)
    while todo:
        t = todo.pop()
        st = tl.start[t]
        if st <= eps:
            continue
        binding = [s for s, b in p.preds[t]
                   if arrival(p, s, t, b, groups[s], groups[t], tl.end[s], codecs) >= st - eps]
        for j in groups[t]:
            lst = ends_on[j]
            i = bisect_right(lst, (st + eps, p.n)) - 1
            while i >= 0 and lst[i][0] >= st - eps:
                if lst[i][1] != t:
                    binding.append(lst[i][1])
                i -= 1
        for u in binding:
            if u not in found:
                found.add(u)
                todo.append(u)
    return sorted(found)


# -- proposing a move ------------------------------------------------------------------

def _propose(p: Problem, cur: State, tl: Timeline, focus: int, pos: Sequence[int],
             rng: np.random.Generator, tp: bool, codecs: bool, seen: set[Key],
             greed: float) -> State | None:
    """An untried, feasible state one move from ``cur`` touching ``focus``, or None."""
    cands = [_tidy(p, mv.apply(cur), focus)
             for mv in moves(p, cur, tp=tp, codecs=codecs, tasks=(focus,))]
    if not cands:
        return None
    local = _LocalScore(p, cur, tl, focus, pos)
    scored = sorted(range(len(cands)), key=lambda i: (local.score(cands[i]), i))
    while scored:
        i = 0
        while i < len(scored) - 1 and rng.random() >= greed:
            i += 1
        cand = cands[scored.pop(i)]
        if key(cand) not in seen and not violation(p, cand.groups):
            return cand
    return None


class _LocalScore:
    """Scores a state that differs from ``cur`` only around ``focus``, without a
    simulator call: when the focus task's outputs would be at its successors if
    everything before it in the order stayed where it is."""

    def __init__(self, p: Problem, cur: State, tl: Timeline, focus: int,
                 pos: Sequence[int]) -> None:
        self.p, self.focus = p, focus
        self.busy: list[list[tuple[float, float]]] = [[] for _ in range(p.m)]
        for u, g in enumerate(cur.groups):
            if pos[u] < pos[focus]:
                for j in g:
                    self.busy[j].append((tl.start[u], tl.end[u]))
        for lst in self.busy:
            lst.sort()
        self.edges = _incident(p, focus)  # the only codecs slot() and arrival() read
        self.ls = ListScheduler(p)
        self.ls.end, self.ls.busy = tl.end, self.busy

    def score(self, s: State) -> float:
        p, t, ls = self.p, self.focus, self.ls
        cs = {e: p.codec_table[s.codecs[e]] for e in self.edges
              if s.codecs.get(e, "none") != "none"}
        ls.groups, ls.codecs = s.groups, cs
        g = s.groups[t]
        _, finish = ls.slot(t, g)
        out = finish
        for d, b in p.succs[t]:
            out = max(out, arrival(p, t, d, b, g, s.groups[d], finish, cs))
        return out
