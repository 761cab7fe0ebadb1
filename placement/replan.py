"""Re-planning after devices leave or join: keep what still fits, move few tasks.

Three steps:

1. **Repair**: list-schedule on the new cluster in upward-rank order, as HEFT does, but
   sticky: a task whose old device(s) are still present, allowed and have room stays
   unless a device it could not use before (one that joined, or came back at another
   speed) would finish it more than :data:`STICK` earlier; every other task goes where it
   finishes earliest. A second repair lets staying tasks move to any device by the same
   rule, and HEFT from scratch is a third candidate; the start is the one with the least
   makespan × (1 + :data:`MOVE_PRICE` × share of tasks moved), so the plan is rebuilt
   only when keeping it costs much more latency than moving.
2. **Improve** with an improving policy (``search``, ``gnn``) started from the repair,
   within a budget of simulator calls.
3. **Settle**: undo each move the improver made to a task that could have stayed, when
   undoing it costs at most :data:`MOVE_TOLERANCE` of latency, so a task only moves for
   a real gain.

Pure: no clock unless one is passed in for the decision time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from edgeswarm.placement.cluster import Cluster
from edgeswarm.placement.codecs import CodecSpec
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.heft import list_schedule
from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.policies import Options, Solution, solve
from edgeswarm.placement.problem import INF, Group, Problem
from edgeswarm.placement.simulator import (
    ListScheduler,
    Timeline,
    evaluate,
    schedule_of,
    violation,
)
from edgeswarm.placement.taskgraph import TaskGraph

#: In the repair, a task stays on its old device(s) unless another finishes it more than
#: this share earlier.
STICK = 0.05

#: Choosing where to start improving from, moving every task is worth it when it cuts
#: latency by more than this share.
MOVE_PRICE = 0.1

#: A kept task moved by the improver goes back when that costs at most this share of
#: the improved latency (the total cost of all undone moves stays within it).
MOVE_TOLERANCE = 0.01

#: Default improving budget of a re-plan, in simulator calls per task: half of a plan
#: from scratch's, since it starts from the best of the repairs and the scratch starts.
REPLAN_BUDGET = 1

#: ``policy`` value that stops after the repair step (no improving policy).
REPAIR_ONLY = "repair"

IndexCodecs = dict[tuple[int, int], str]


@dataclass(frozen=True)
class Replan:
    #: The new plan, simulated on the new cluster and feasible.
    plan: Plan
    #: Tasks whose device(s) differ from the old plan.
    tasks_moved: int
    #: Tasks left where they were.
    kept: int


def replan(plan: Plan, graph: TaskGraph, new_cluster: Cluster, policy: str = "search",
           opts: Options | None = None, clock: Callable[[], float] | None = None,
           old_cluster: Cluster | None = None,
           codec_table: Mapping[str, CodecSpec] | None = None) -> Replan:
    """Adapt ``plan`` to ``new_cluster`` (devices left, joined or changed).

    ``policy`` is the improving policy of step 2 (``"search"`` or ``"gnn"``), or
    ``"repair"`` to stop after the repair. ``opts.budget`` bounds its simulator calls
    (default |V|, :data:`REPLAN_BUDGET`); choosing the start costs none (its candidates
    are list schedules) and the settle step at most one per task the improver moved.
    ``old_cluster`` tells which devices are new or changed speed; without it, devices
    absent from the old plan's memory table (or, for a plan never simulated, unused by
    it) count as new. ``codec_table``: the codecs the edges may carry and what they cost
    (default: the built-in table), so a plan whose codecs were measured on the model
    keeps them. Raises
    :class:`PlacementInfeasible` naming the task when no device of the new cluster may
    run it or has room for it.
    """
    opts = opts or Options()
    t0 = clock() if clock else 0.0
    # raises when a task may run on no device left
    p = Problem(graph, new_cluster) if codec_table is None else Problem(graph, new_cluster,
                                                                        codec_table)
    calls0 = p.calls
    old = _old_groups(p, plan)
    order = list(p.default_order)
    codecs = _old_codecs(p, plan) if opts.codecs else {}
    groups, codecs, order = _start(p, old, order, codecs, opts, _fresh(p, plan, old_cluster))
    name = REPAIR_ONLY
    if policy != REPAIR_ONLY:
        groups, codecs, order = _improve(p, policy, opts, groups, codecs, order)
        groups = _settle(p, groups, codecs, order, old, opts.tp)
        codecs = _cut_only(p, groups, codecs)
        name = policy
    decision = (clock() - t0) if clock else 0.0
    calls = p.calls - calls0
    specs = {k: p.codec_table[v] for k, v in codecs.items()}
    schedule = schedule_of(p, groups, specs, order)
    if not schedule.feasible:  # every step respects memory: this is a bug, not bad input
        raise PlacementInfeasible(f"replan produced an infeasible plan: {schedule.reason}")
    new = p.to_plan(groups, f"replan/{name}", codecs, order)
    moved = tasks_moved(plan, new)
    return Replan(new.with_schedule(schedule, decision_s=decision, simulator_calls=calls),
                  tasks_moved=moved, kept=p.n - moved)


def tasks_moved(old: Plan, new: Plan) -> int:
    """Tasks of ``new`` whose set of devices differs from ``old`` (or that ``old`` lacks)."""
    return sum(1 for tid, devs in new.assignments.items()
               if set(devs) != set(old.assignments.get(tid, ())))


def _old_groups(p: Problem, plan: Plan) -> list[Group | None]:
    """The old plan by index on the new cluster; None where a device is gone."""
    extra = [t for t in plan.assignments if t not in p.t_index]
    if extra:
        raise InvalidInput(f"replan: the plan assigns task(s) {extra[:5]} that are not in "
                           f"the graph; pass the graph the plan was made for")
    out: list[Group | None] = []
    for tid in p.task_ids:
        devs = plan.assignments.get(tid)
        if devs is None or any(d not in p.d_index for d in devs):
            out.append(None)
        else:
            out.append(tuple(p.d_index[d] for d in devs))
    return out


def _usable(p: Problem, t: int, g: Group, tp: bool) -> bool:
    """``g`` is still a legal place for ``t`` (devices allowed; a group only with TP)."""
    if len(g) > 1 and not (tp and p.splittable[t]):
        return False
    return all(p.comp[t][j] < INF for j in g)


def _repair(p: Problem, old: Sequence[Group | None], order: Sequence[int],
            codecs: IndexCodecs, tp: bool, fresh: set[int] | None
            ) -> tuple[list[Group], Timeline] | None:
    """List-schedule in ``order``: a task stays where it was unless a ``fresh`` device
    (any device when None) finishes it clearly earlier; a task that cannot stay goes
    where it finishes earliest. Returns the plan and its timeline (the simulator's), or
    None: a task fits nowhere."""
    book = MemoryBook(p)
    ls = ListScheduler(p, {k: p.codec_table[v] for k, v in codecs.items()})
    for t in order:
        g = old[t]
        stay = g is not None and _usable(p, t, g, tp) and book.fits(t, g)
        free = p.allowed[t] if not stay or fresh is None else [
            j for j in p.allowed[t] if j in fresh]
        best_f, j = ls.first_finish(t, book.room(t, free))
        best: Group | None = (j,) if j >= 0 else None
        if stay and g is not None and g != best and ls.finish(t, g) <= best_f * (1.0 + STICK):
            best = g
        if best is None:
            return None
        book.add(t, best)
        ls.place(t, best)
    return list(ls.groups), ls.timeline()


Start = tuple[list[Group], IndexCodecs, list[int]]


def _start(p: Problem, old: Sequence[Group | None], order: list[int],
           codecs: IndexCodecs, opts: Options, fresh: set[int]) -> Start:
    """The plan to improve: of the repairs (kept tasks may move to fresh devices only, or
    to any device) and the start plans of a plan from scratch (HEFT, and HEFT's rule
    with PEFT's order or look-ahead, or anchored on a fast device), the one with the
    least makespan × (1 + MOVE_PRICE × share of tasks moved). Every candidate is a list
    schedule whose timeline comes with it: choosing costs no simulator call."""
    cands: list[tuple[Start, Timeline]] = []
    for limit in (fresh, None):
        repaired = _repair(p, old, order, codecs, opts.tp, limit)
        if repaired is not None:
            groups, timeline = repaired
            cands.append(((groups, _cut_only(p, groups, codecs), order), timeline))
    cands.extend(_scratch_starts(p, order, opts))
    if not cands:
        raise _no_plan(p, order)

    def cost(cand: tuple[Start, Timeline]) -> float:
        (groups, _, _), timeline = cand
        moved = sum(1 for t, g in enumerate(old) if g is None or set(g) != set(groups[t]))
        return timeline.makespan * (1.0 + MOVE_PRICE * moved / max(p.n, 1))

    return min(cands, key=cost)[0]


def _no_plan(p: Problem, order: list[int]) -> PlacementInfeasible:
    """Why no list schedule fits: HEFT's error, naming the task."""
    try:
        list_schedule(p, order, "replan")
    except PlacementInfeasible as exc:
        return exc
    return PlacementInfeasible("no start plan fits the new cluster's memory")


def _scratch_starts(p: Problem, order: list[int], opts: Options
                    ) -> list[tuple[Start, Timeline]]:
    """HEFT's plan and the other start plans of the GNN policy from scratch (numpy only),
    with their timelines."""
    from edgeswarm.placement.gnn.start import scratch_starts
    from edgeswarm.placement.gnn.tables import Tables

    starts = scratch_starts(Tables.of(p), order, opts, heft=True)
    return [((groups, codecs, od), timeline) for groups, codecs, od, timeline in starts]


def _fresh(p: Problem, plan: Plan, old_cluster: Cluster | None) -> set[int]:
    """Devices the old plan could not use: new ones, and ones whose speed changed."""
    if old_cluster is not None:
        return {j for j, d in enumerate(p.dev_ids)
                if d not in old_cluster or old_cluster.device(d).flops != p.dev_flops[j]}
    # a plan simulated on the old cluster lists every device of it in its memory table
    known = (set(plan.schedule.memory_bytes) if plan.schedule is not None
             else plan.used_devices())
    return {j for j, d in enumerate(p.dev_ids) if d not in known}


def _old_codecs(p: Problem, plan: Plan) -> IndexCodecs:
    out: IndexCodecs = {}
    for (src, dst), name in plan.codecs.items():
        key = (p.t_index.get(src, -1), p.t_index.get(dst, -1))
        if key[0] >= 0 and key[1] >= 0 and name in p.codec_table and name != "none":
            out[key] = name
    return out


def _cut_only(p: Problem, groups: Sequence[Group], codecs: Mapping[tuple[int, int], str]
              ) -> IndexCodecs:
    """Codecs on edges whose data still crosses devices."""
    return {(s, d): name for (s, d), name in codecs.items()
            if not set(groups[d]) <= set(groups[s])}


def _improve(p: Problem, policy: str, opts: Options, groups: list[Group],
             codecs: IndexCodecs, order: list[int]
             ) -> tuple[list[Group], IndexCodecs, list[int]]:
    budget = opts.budget if opts.budget is not None else REPLAN_BUDGET * p.n
    start = Solution(list(groups), dict(codecs), list(order))
    better = solve(p, policy, Options(budget=budget, tp=opts.tp, codecs=opts.codecs,
                                      seed=opts.seed, start=start))
    new_groups = p.groups_of(better)
    new_codecs = {(p.t_index[s], p.t_index[d]): c for (s, d), c in better.codecs.items()}
    return new_groups, _cut_only(p, new_groups, new_codecs), p.order_of(better)


def _settle(p: Problem, groups: list[Group], codecs: IndexCodecs, order: Sequence[int],
            old: Sequence[Group | None], tp: bool) -> list[Group]:
    """Undo moves of tasks that could stay, where staying costs little latency."""
    specs = {k: p.codec_table[v] for k, v in codecs.items()}
    anchor = evaluate(p, groups, specs, order).makespan
    limit = anchor * (1.0 + MOVE_TOLERANCE)
    out = list(groups)
    for t in order:
        g = old[t]
        if g is None or set(g) == set(out[t]) or (len(g) > 1 and not tp):
            continue
        trial = list(out)
        trial[t] = g
        if violation(p, trial):
            continue
        if evaluate(p, trial, specs, order).makespan <= limit:
            out = trial
    return out
