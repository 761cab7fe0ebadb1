"""The cost model: a plan on a cluster → the timeline of one inference.

Semantics (the contract every policy is trained and judged against):

- A task runs on one device, or split over a tensor-parallel group; a group divides the
  work in proportion to its members' speeds and then joins the partial outputs with an
  all-reduce (the cheaper of star and ring, by link latency and bandwidth). All members
  are busy from the task's start to its end.
- A transfer between different devices takes ``latency_s + bytes / bandwidth_Bps``; on
  the same device nothing. A successor on several devices needs the data on each; the
  output of a tensor-parallel task is on every member of its group.
- A codec on a cut edge adds its encode time (at the sender's speed) and decode time (at
  the receiver's) and carries ``ratio`` × the bytes.
- A device runs one task at a time. Tasks are list-scheduled in the plan's priority
  order (default: HEFT's upward rank), each into the earliest idle slot of its device(s)
  after its inputs arrive (insertion-based, as HEFT). Links are not contended.
- Memory per device: its tasks' parameters (a group member holds its share) plus the
  largest input + output activation of any task it runs. Over memory is infeasible.
"""

from __future__ import annotations

from bisect import insort
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgeswarm.placement.cluster import Cluster, DeviceId
from edgeswarm.placement.codecs import DEFAULT_CODECS, CodecSpec
from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.plan import Plan, Schedule, Slot
from edgeswarm.placement.problem import INF, Group, Problem
from edgeswarm.placement.taskgraph import TaskGraph

Codecs = Mapping[tuple[int, int], CodecSpec]


@dataclass(frozen=True)
class Timeline:
    start: list[float]
    end: list[float]
    makespan: float


def evaluate(p: Problem, groups: Sequence[Group], codecs: Codecs | None = None,
             order: Sequence[int] | None = None) -> Timeline:
    """Schedule ``groups`` (task index → device indices) and return start/end times.

    Does not check feasibility (see :func:`violation`); counts one simulator call.
    """
    p.calls += 1
    ls = ListScheduler(p, codecs)
    for t in order if order is not None else p.default_order:
        ls.place(t, groups[t])
    return ls.timeline()


def evaluate_from(p: Problem, groups: Sequence[Group], codecs: Codecs | None,
                  order: Sequence[int], base: Timeline, k: int) -> Timeline:
    """:func:`evaluate`, given that the first ``k`` tasks of ``order`` keep the devices,
    input codecs and times they have in ``base`` (the timeline of a plan that differs
    only from ``order[k]`` on). List scheduling places tasks in order, so a change never
    reaches back before it: those ``k`` are copied, the rest are placed. The same
    timeline as :func:`evaluate`, in less time; counts one simulator call."""
    p.calls += 1
    ls = ListScheduler(p, codecs)
    for t in order[:k]:
        st, en = base.start[t], base.end[t]
        ls.groups[t] = groups[t]
        ls.start[t] = st
        ls.end[t] = en
        for j in groups[t]:
            ls.busy[j].append((st, en))
    for busy in ls.busy:
        busy.sort()
    for t in order[k:]:
        ls.place(t, groups[t])
    return ls.timeline()


class ListScheduler:
    """Places tasks one at a time, in a topological order, into the earliest idle slot.

    The simulator replays a whole plan with it; list-scheduling policies (HEFT, PEFT,
    greedy) probe candidate devices with :meth:`finish` before committing with
    :meth:`place`, so their schedules are exactly what the simulator predicts.
    """

    def __init__(self, p: Problem, codecs: Codecs | None = None) -> None:
        self.p = p
        self.codecs = codecs
        self.groups: list[Group] = [()] * p.n
        self.start = [0.0] * p.n
        self.end = [0.0] * p.n
        self.busy: list[list[tuple[float, float]]] = [[] for _ in range(p.m)]

    def ready(self, t: int, g: Group) -> float:
        """When every input of ``t`` is on every device of ``g``."""
        p, end, groups, codecs = self.p, self.end, self.groups, self.codecs
        ready = 0.0
        if len(g) == 1 and not codecs:  # the common case, inlined: the simulator's hot loop
            j = g[0]
            lat, ibw = p.lat, p.inv_bw
            for s, b in p.preds[t]:
                src = groups[s]
                if j in src:
                    at = end[s]
                elif len(src) == 1:
                    q = src[0]
                    at = end[s] + (lat[q][j] + b * ibw[q][j])
                else:
                    at = arrival(p, s, t, b, src, g, end[s], codecs)
                if at > ready:
                    ready = at
            return ready
        for s, b in p.preds[t]:
            at = arrival(p, s, t, b, groups[s], g, end[s], codecs)
            if at > ready:
                ready = at
        return ready

    def arrivals(self, t: int) -> list[float]:
        """:meth:`ready` of ``(j,)`` for every device ``j``, all at once."""
        p, end, groups = self.p, self.end, self.groups
        if self.codecs:
            return [self.ready(t, (j,)) for j in range(p.m)]
        at = [0.0] * p.m
        for s, b in p.preds[t]:
            src, e = groups[s], end[s]
            if len(src) == 1:
                q = src[0]
                lq, iq = p.lat[q], p.inv_bw[q]
                arr = [e + (x + b * y) for x, y in zip(lq, iq, strict=True)]
                arr[q] = e
            else:
                arr = [arrival(p, s, t, b, src, (j,), e, None) for j in range(p.m)]
            at = [x if x > y else y for x, y in zip(at, arr, strict=True)]
        return at

    def first_finish(self, t: int, devices: Sequence[int], extra: Sequence[float] | None = None,
                     ready: Sequence[float] | None = None) -> tuple[float, int]:
        """The least finish time of ``t`` alone on one of ``devices``, plus ``extra[j]``
        (a look-ahead) when given, and that device (the first of equals); ``(inf, -1)``
        when ``devices`` is empty. ``ready``: :meth:`arrivals`, when the caller has it.
        The same choice as :meth:`finish` on each device, faster: a device whose
        arrival + compute is already no better is not searched for an idle slot."""
        at = ready if ready is not None else self.arrivals(t)
        comp, busy = self.p.comp[t], self.busy
        best, best_j = INF, -1
        for j in devices:
            c = comp[j]
            x = extra[j] if extra is not None else 0.0
            if at[j] + c + x < best:
                f = earliest_start(busy[j], at[j], c) + c + x
                if f < best:
                    best, best_j = f, j
        return best, best_j

    def timeline(self) -> Timeline:
        """The timeline of the tasks placed so far (of the whole plan, once all are)."""
        return Timeline(self.start, self.end, max(self.end) if self.end else 0.0)

    def slot(self, t: int, g: Group) -> tuple[float, float]:
        """(start, end) that placing ``t`` on ``g`` would get."""
        p = self.p
        ready = self.ready(t, g)
        if len(g) == 1:
            dur = p.comp[t][g[0]]
            st = earliest_start(self.busy[g[0]], ready, dur)
            return st, st + dur
        dur = p.group_compute(t, g) + p.allreduce_s(g, p.out[t])
        st = self.common_start(g, ready, dur)
        return st, st + dur

    def common_start(self, g: Group, ready: float, dur: float) -> float:
        """The earliest start from ``ready`` at which every device of ``g`` is idle for
        ``dur``."""
        st = ready
        while True:
            moved = max(earliest_start(self.busy[j], st, dur) for j in g)
            if moved == st:
                return st
            st = moved

    def finish(self, t: int, g: Group) -> float:
        return self.slot(t, g)[1]

    def place(self, t: int, g: Group) -> tuple[float, float]:
        st, en = self.slot(t, g)
        for j in g:
            insort(self.busy[j], (st, en))
        self.groups[t] = g
        self.start[t] = st
        self.end[t] = en
        return st, en


def arrival(p: Problem, src: int, dst: int, nbytes: float, g_src: Group, g_dst: Group,
            end_src: float, codecs: Codecs | None) -> float:
    """When the output of ``src`` (ending at ``end_src`` on ``g_src``) is on every device
    of ``g_dst``: the transfer rule for one edge, with its codec if it has one."""
    spec = codecs.get((src, dst)) if codecs else None
    lat, ibw, flops = p.lat, p.inv_bw, p.dev_flops
    worst = end_src
    for j in g_dst:
        if j in g_src:
            continue
        best = INF
        for q in g_src:
            if spec is None:
                x = lat[q][j] + nbytes * ibw[q][j]
            else:
                x = (nbytes * spec.encode_flops_per_byte / flops[q] + lat[q][j]
                     + nbytes * spec.ratio * ibw[q][j]
                     + nbytes * spec.decode_flops_per_byte / flops[j])
            if x < best:
                best = x
        if end_src + best > worst:
            worst = end_src + best
    return worst


def earliest_start(intervals: list[tuple[float, float]], ready: float, dur: float) -> float:
    cand = ready
    for a, b in intervals:
        if b <= cand:
            continue
        if cand + dur <= a:
            break
        cand = b
    return cand


def memory(p: Problem, groups: Sequence[Group]) -> list[int]:
    """Bytes each device needs: parameters of its tasks plus its largest activation."""
    book = MemoryBook(p)
    for t, g in enumerate(groups):
        book.add(t, g)
    return book.used()


def violation(p: Problem, groups: Sequence[Group]) -> str:
    """Why ``groups`` breaks a constraint, or '' when it is feasible."""
    for t, g in enumerate(groups):
        if not g:
            return f"task {p.task_ids[t]!r} is assigned to no device"
        if len(g) > 1 and not p.splittable[t]:
            return (f"task {p.task_ids[t]!r} is not splittable but is assigned to "
                    f"{len(g)} devices")
        for j in g:
            if p.comp[t][j] == INF:
                return f"task {p.task_ids[t]!r} may not run on device {p.dev_ids[j]!r}"
    for j, used in enumerate(memory(p, groups)):
        if used > p.dev_mem[j]:
            return (f"device {p.dev_ids[j]!r} needs {used} bytes but has "
                    f"{p.dev_mem[j]}")
    return ""


def schedule_of(p: Problem, groups: Sequence[Group], codecs: Codecs | None = None,
                order: Sequence[int] | None = None) -> Schedule:
    """The full :class:`Schedule` (ids, memory, feasibility) of an index-level plan."""
    tl = evaluate(p, groups, codecs, order)
    mem = memory(p, groups)
    reason = violation(p, groups)
    slots = {p.task_ids[t]: Slot(tuple(p.dev_ids[j] for j in groups[t]), tl.start[t], tl.end[t])
             for t in range(p.n)}
    return Schedule(slots, tl.makespan,
                    {DeviceId(p.dev_ids[j]): mem[j] for j in range(p.m)},
                    feasible=not reason, reason=reason)


def simulate(graph: TaskGraph, cluster: Cluster, plan: Plan,
             codec_table: Mapping[str, CodecSpec] = DEFAULT_CODECS) -> Schedule:
    """Evaluate ``plan``: its schedule, makespan, per-device memory and feasibility.

    Raises :class:`InvalidInput` for a plan that does not fit the graph or cluster
    (a task left out, an unknown device or codec); a plan that breaks a constraint
    (memory, allowed devices) comes back with ``feasible=False`` and the reason.
    """
    p = Problem(graph, cluster, codec_table)
    return schedule_of(p, p.groups_of(plan), p.codecs_of(plan), p.order_of(plan))
