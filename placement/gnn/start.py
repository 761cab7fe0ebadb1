"""Start plans for the search: HEFT's rule made aware of codecs and tensor parallelism.

HEFT (:mod:`edgeswarm.placement.heft`) picks each task's device by earliest finish time
with plain transfers and single devices. When the plan may use codecs and
tensor-parallel groups, the same rule is much stronger if it sees them: each candidate
device is costed with the cheapest codec on every incoming edge, and a splittable task
then grows its group one device at a time while that makes it finish earlier. Tasks
are committed through the simulator's own :class:`ListScheduler`, so the schedule
built is exactly the one the simulator predicts for the plan (same priority order, same
insertion rule): like HEFT's, it is known without a simulator call.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import numpy as np

from edgeswarm.placement.codecs import CodecSpec
from edgeswarm.placement.errors import PlacementInfeasible
from edgeswarm.placement.gnn.features import allreduce_appended
from edgeswarm.placement.gnn.tables import Tables
from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.moves import MAX_GROUP
from edgeswarm.placement.policies import Options
from edgeswarm.placement.problem import Group
from edgeswarm.placement.simulator import ListScheduler, Timeline

Codecs = dict[tuple[int, int], str]
#: a start plan: groups, codecs, priority order and the timeline the simulator predicts
Start = tuple[list[Group], Codecs, list[int], Timeline]


def optimistic(tb: Tables, use_codecs: bool) -> tuple[list[int], np.ndarray]:
    """PEFT's look-ahead (Arabnejad and Barbosa, 2014): the optimistic cost table
    ``OCT[t, k]`` (the longest way from t on device k to an exit if every later task
    took its best device, transfers at their mean cost, contention ignored) and the
    order PEFT's ready list takes tasks in (highest mean OCT first)."""
    p = tb.p
    table, _ = tb.edge_costs(use_codecs)
    off = ~np.eye(tb.m, dtype=bool)
    mean = table[:, off].mean(axis=1) if tb.m > 1 else np.zeros(len(tb.es))
    oct_ = np.zeros((tb.n, tb.m))
    for t in reversed(p.topo):
        for s, _ in p.succs[t]:
            reach = oct_[s] + tb.comp[s]  # inf where s may not run
            best = np.minimum(reach, reach.min() + mean[tb.edge_index[(t, s)]])
            np.maximum(oct_[t], best, out=oct_[t])
    rank = np.where(tb.allowed, oct_, 0.0).sum(axis=1) / tb.allowed.sum(axis=1)
    pos = {t: i for i, t in enumerate(p.topo)}
    waiting = [len(p.preds[t]) for t in range(tb.n)]
    ready = [(-float(rank[t]), pos[t], t) for t in range(tb.n) if not waiting[t]]
    heapq.heapify(ready)
    order = []
    while ready:
        t = heapq.heappop(ready)[2]
        order.append(t)
        for s, _ in p.succs[t]:
            waiting[s] -= 1
            if not waiting[s]:
                heapq.heappush(ready, (-float(rank[s]), pos[s], s))
    return order, oct_


def aware_list_schedule(tb: Tables, order: Sequence[int], *, use_codecs: bool, tp: bool,
                        lookahead: np.ndarray | None = None,
                        anchor: tuple[int, float] | None = None
                        ) -> tuple[list[Group], Codecs, Timeline]:
    """Earliest-finish-time list scheduling of ``order`` with the cheapest codec per
    incoming edge and, for splittable tasks, greedily grown tensor-parallel groups.
    With ``lookahead`` (n × m), a task goes where finish time + lookahead is least.
    With ``anchor`` (device j, slack), a task goes to j whenever j may run it, has room
    and finishes it within ``(1 + slack)`` × the best finish: where transfers cost more
    than compute, keeping the work together on one fast device (as CPOP does with the
    critical path) beats spreading it task by task. Returns the plan and its timeline
    (exactly the simulator's for the plan in ``order``)."""
    p = tb.p
    spec: dict[tuple[int, int], CodecSpec] = {}
    ls = ListScheduler(p, spec)
    book = MemoryBook(p)
    codecs: Codecs = {}
    for t in order:
        devices = book.room(t, p.allowed[t])
        if not devices:
            raise PlacementInfeasible(
                f"task {p.task_ids[t]!r} ({p.param[t]} parameter bytes) fits in the memory "
                f"of none of its devices ({', '.join(p.dev_ids[j] for j in p.allowed[t])}) "
                f"next to the tasks placed before it")
        grows = tp and bool(tb.splittable[t])
        if use_codecs or grows:
            ready, choice = _arrivals(tb, ls, t, use_codecs)
            at = ready.tolist()
        else:  # plain transfers: the simulator's own rule
            at = ls.arrivals(t)
        ahead = lookahead[t].tolist() if lookahead is not None else None
        best, first = ls.first_finish(t, devices, ahead, at)
        group: Group = (first,)
        if anchor is not None and anchor[0] in devices and first != anchor[0]:
            end, j = ls.first_finish(t, (anchor[0],), ahead, at)
            if end <= best * (1.0 + anchor[1]):
                best, group = end, (j,)
        if grows:
            group = _grow(tb, ls, book, t, group,
                          best - (ahead[group[0]] if ahead is not None else 0.0), ready)
        chosen: Codecs = {}
        for i, (s, _) in enumerate(p.preds[t] if use_codecs else ()):
            if set(group) <= set(ls.groups[s]):
                continue
            if len(group) == 1 and len(ls.groups[s]) == 1:
                c = int(choice[i, group[0]])
                name = tb.codec_names[c] if c >= 0 else "none"
            else:
                name = tb.best_codec(s, t, [*ls.groups[:t], group, *ls.groups[t + 1:]])
            if name != "none":
                chosen[(s, t)] = name
        for key, name in chosen.items():
            spec[key] = p.codec_table[name]
        codecs.update(chosen)
        ls.place(t, group)
        book.add(t, group)
    return list(ls.groups), codecs, ls.timeline()


#: Anchored starts: the devices with the least total compute time over the tasks they
#: may run, and the slacks tried on each.
ANCHOR_DEVICES = 2
ANCHOR_SLACKS = (0.25, 1.0, 4.0)


def anchors(tb: Tables) -> list[tuple[int, float]]:
    """The (device, slack) pairs of the anchored start plans."""
    total = np.where(tb.allowed, tb.comp, 0.0).sum(axis=0)
    # a device that may not run some task is ranked after those that may run them all
    missing = (~tb.allowed).sum(axis=0)
    best = np.lexsort((total, missing))[:ANCHOR_DEVICES]
    return [(int(j), slack) for j in best.tolist() for slack in ANCHOR_SLACKS]


def scratch_starts(tb: Tables, order: list[int], opts: Options, *,
                   heft: bool = False) -> Iterator[Start]:
    """List schedules aware of codecs and tensor parallelism (when allowed) in HEFT's or
    PEFT's priority order, each task going where it finishes first (HEFT's rule) or
    where finish plus PEFT's look-ahead is least (the four combinations; HEFT's own is
    skipped when it would be HEFT's plan again); then HEFT's rule anchored on each of
    the fastest devices (:func:`~edgeswarm.placement.gnn.start.anchors`). ``heft``:
    include HEFT's own plan (the same rule, same order) too. Numpy only: re-planning
    uses them too."""
    aware = opts.codecs or (opts.tp and bool(tb.splittable.any()))
    oct_order, oct_ = optimistic(tb, opts.codecs)
    tries: list[tuple[list[int], np.ndarray | None, tuple[int, float] | None]] = [
        (order, None, None), (oct_order, oct_, None), (order, oct_, None),
        (oct_order, None, None)]
    tries += [(order, None, a) for a in anchors(tb)]
    for od, ahead, anchor in tries:
        if ahead is None and anchor is None and od == order and not aware and not heft:
            continue  # that is HEFT's plan again
        try:
            groups, codecs, timeline = aware_list_schedule(
                tb, od, use_codecs=opts.codecs, tp=opts.tp, lookahead=ahead, anchor=anchor)

        except PlacementInfeasible:
            continue  # its greedy choices left a task without memory
        yield groups, codecs, list(od), timeline


def _arrivals(tb: Tables, ls: ListScheduler, t: int,
              use_codecs: bool) -> tuple[np.ndarray, np.ndarray]:
    """When all of t's inputs could be on each device (each edge with its cheapest codec
    for that device), and that codec per (incoming edge, device) (-1: none)."""
    p = tb.p
    preds = p.preds[t]
    if not preds:
        return np.zeros(tb.m), np.zeros((0, tb.m), dtype=np.int8)
    table, codec = tb.edge_costs(use_codecs)
    edges = np.array([tb.edge_index[(s, t)] for s, _ in preds])
    src = np.array([ls.groups[s][0] for s, _ in preds])
    cost = table[edges, src, :]
    choice = codec[edges, src, :]
    for i, (s, _) in enumerate(preds):
        for q in ls.groups[s][1:]:  # a tensor-parallel source: its output is on every member
            cost[i] = np.minimum(cost[i], table[edges[i], q, :])
    ends = np.array([ls.end[s] for s, _ in preds])[:, None]
    return (ends + cost).max(axis=0), choice


def _grow(tb: Tables, ls: ListScheduler, book: MemoryBook, t: int, g: Group, end: float,
          ready: np.ndarray) -> Group:
    """Add devices to t's group while its estimated finish improves."""
    with np.errstate(divide="ignore"):
        inv = 1.0 / tb.comp[t]  # 0 where t may not run
    while len(g) < MAX_GROUP:
        idx = list(g)
        ok = tb.allowed[t].copy()
        ok[idx] = False
        dur = 1.0 / (inv[idx].sum() + inv) + allreduce_appended(tb, g, float(tb.out[t]))
        earliest = np.maximum(ready[idx].max(), ready) + dur
        best: tuple[float, Group] | None = None
        for j in np.nonzero(ok & (earliest < end * (1 - 1e-9)))[0].tolist():
            trial = (*g, j)
            if not book.fits(t, trial):
                continue
            st = ls.common_start(trial, float(max(ready[[*idx, j]])), float(dur[j]))
            if st + dur[j] < end * (1 - 1e-9) and (best is None or st + dur[j] < best[0]):
                best = (st + dur[j], trial)
        if best is None:
            return g
        end, g = best
    return g
