"""How good can a plan be? A provable lower bound, and the exact optimum of tiny cases.

:func:`lower_bound` is below the simulated makespan of every feasible plan (any
devices, priority order, codecs and, with ``tp``, tensor-parallel groups). Memory and
insertion gaps are relaxed away; everything else is counted from below:

- *path* (:func:`through`, :func:`path_bound`): for each task t and device j, a floor
  on the makespan of any plan that runs t on j. Each task takes at least its run time
  on j (with ``tp``, a splittable task may run on all its allowed devices at once:
  1 / Σ 1/comp). A predecessor either runs on j too — then it and the other sharers
  run one at a time on j, best in release order — or sends its output over a link, at
  least the cheapest latency + bytes / bandwidth (or codec encode + compressed
  transfer + decode) from a device it may run on. Successors likewise, run on j in
  longest-tail-first order or reached over a link. The path bound is the max over
  tasks of the least floor over their devices; it includes the classic critical path
  (fastest times, cheapest transfers, zero when two tasks may share a device).
- *load* (:func:`load`): for every distinct allowed-device set S and for all devices,
  the tasks that may only run inside S keep S's devices busy. A device j busy for time
  b does at most speed_j·b of work, and task t needs at least w_t = min_j
  speed_j·comp[t][j] of it on any device or group (a group's members are all busy for
  the task's whole run, and Σ speed / Σ 1/comp ≥ min speed·comp), so makespan ≥
  Σ w_t / Σ_{j∈S} speed_j; with unit speeds, Σ min_j comp[t][j] / |S|.
- *deadline load* (:func:`deadline_load`): a makespan M also forbids every device j
  whose path floor for t exceeds M, which narrows each task's devices; the least M
  that passes the load test under those narrowed sets is a bound too.

:func:`optimum` is exact over the plan space the simulator defines for single-device
plans: every assignment of each task to one allowed device, scheduled by the simulator
in the default (upward-rank) priority order, memory respected, no codecs. Tensor
parallelism, other priority orders and codecs are outside it, so a policy using them
may beat it; nothing feasible beats :func:`lower_bound`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.problem import INF, Group, Problem
from edgeswarm.placement.simulator import ListScheduler


def fastest(p: Problem, t: int, tp: bool = False) -> float:
    """The least time task ``t`` can take (over all its allowed devices with ``tp``)."""
    times = [p.comp[t][j] for j in p.allowed[t]]
    if tp and p.splittable[t] and len(times) > 1:
        return 1.0 / sum(1.0 / x if x > 0 else INF for x in times)
    return min(times)


class _Links:
    """Transfer-time floors between every pair of devices (codecs included)."""

    def __init__(self, p: Problem, codecs: bool) -> None:
        self.lat = np.array(p.lat, dtype=float)
        self.ibw = np.array(p.inv_bw, dtype=float)
        inv = 1.0 / np.array(p.dev_flops, dtype=float)
        self.src_inv, self.dst_inv = inv[:, None], inv[None, :]
        self.codecs = [c for c in p.codec_table.values()
                       if c.ratio < 1 or c.encode_flops_per_byte > 0] if codecs else []
        self.off = ~np.eye(p.m, dtype=bool)

    def matrix(self, nbytes: float) -> np.ndarray:
        """[q, j]: least time to move ``nbytes`` from device q to device j ≠ q (inf on q = j)."""
        x = self.lat + nbytes * self.ibw
        for c in self.codecs:
            x = np.minimum(x, nbytes * c.encode_flops_per_byte * self.src_inv + self.lat
                           + nbytes * c.ratio * self.ibw
                           + nbytes * c.decode_flops_per_byte * self.dst_inv)
        return np.where(self.off, x, INF)


def _release_cmax(jobs: list[tuple[float, float]]) -> float:
    """Least time one device finishes ``jobs`` (release, duration): release order."""
    now = 0.0
    for release, dur in sorted(jobs):
        now = max(now, release) + dur
    return now


def _tail_lmax(jobs: list[tuple[float, float]]) -> float:
    """Least max(completion + tail) of ``jobs`` (duration, tail) run one after another
    from 0 on one device: longest tail first (Jackson)."""
    now, worst = 0.0, 0.0
    for dur, tail in sorted(jobs, key=lambda j: -j[1]):
        now += dur
        worst = max(worst, now + tail)
    return worst


def _split(remote: list[float], local: list[tuple[float, float] | None],
           cost: Callable[[list[tuple[float, float]]], float]) -> float:
    """min over which neighbours share the device: those that do are costed together by
    ``cost``; the others by their ``remote`` time (the latest of them counts)."""
    best = INF
    for theta in {0.0, *(r for r in remote if r < INF)}:
        shared = [local[i] for i, r in enumerate(remote) if r > theta]
        if any(x is None for x in shared):
            continue
        best = min(best, max(theta, cost([x for x in shared if x is not None])))
    return best


def through(p: Problem, tp: bool = False, codecs: bool = True) -> np.ndarray:
    """[t, j]: a floor on the makespan of any plan that runs t on j (or on a group
    holding j); inf where t may not run on j.

    It is head + tail: the head R[t, j] ≤ t's start, the tail B[t, j] ≤ the time from
    t's start to the end. A predecessor either shares j (the sharers run one at a time
    on j, in release order) or sends its output over a link; likewise the successors.
    """
    n, m = p.n, p.m
    links = _Links(p, codecs)
    dur = np.full((n, m), INF)
    for t in range(n):
        d = fastest(p, t, tp) if tp and p.splittable[t] else None
        for j in p.allowed[t]:
            dur[t, j] = d if d is not None else p.comp[t][j]
    x = {(s, t): links.matrix(b) for s in range(n) for t, b in p.succs[s]}
    start = np.zeros((n, m))
    for t in p.topo:
        preds = [s for s, _ in p.preds[t]]
        if not preds:
            continue
        fin = [start[s] + dur[s] for s in preds]
        arrive = [np.min(f[:, None] + x[(s, t)], axis=0) for s, f in zip(preds, fin, strict=True)]
        for j in p.allowed[t]:
            local = [(float(start[s, j]), float(dur[s, j])) if dur[s, j] < INF else None
                     for s in preds]
            start[t, j] = _split([float(a[j]) for a in arrive], local, _release_cmax)
    rest = np.zeros((n, m))
    for t in reversed(p.topo):
        succs = [s for s, _ in p.succs[t]]
        tail = np.zeros(m)
        if succs:
            after = []
            for s in succs:
                via = x[(t, s)]
                if tp and p.splittable[t]:  # t's output is on any device of its group
                    src = np.min(via[p.allowed[t]], axis=0)
                    src[p.allowed[t]] = 0.0
                    via = np.where(links.off, np.broadcast_to(src, (m, m)), INF)
                after.append(np.min(via + rest[s][None, :], axis=1))
            for j in p.allowed[t]:
                local = [(float(dur[s, j]), float(rest[s, j] - dur[s, j]))
                         if dur[s, j] < INF else None for s in succs]
                tail[j] = _split([float(a[j]) for a in after], local, _tail_lmax)
        rest[t] = dur[t] + tail
    return np.asarray(start + rest)


def path_bound(p: Problem, tp: bool = False, codecs: bool = True) -> float:
    """Critical path with communication and device sharing: max over tasks of the least
    :func:`through` time over their devices."""
    total = through(p, tp, codecs)
    return float(total.min(axis=1).max()) if p.n else 0.0


def _subsets(p: Problem) -> np.ndarray:
    """Device sets whose load is checked: all, the k fastest, each allowed set, and each
    allowed set's k fastest (rows of a bool matrix)."""
    by_speed = sorted(range(p.m), key=lambda j: -p.dev_flops[j])
    sets = {frozenset(range(p.m))} | {frozenset(a) for a in p.allowed}
    for a in list(sets):
        ranked = [j for j in by_speed if j in a]
        sets |= {frozenset(ranked[:k]) for k in range(1, len(ranked))}
    rows = np.zeros((len(sets), p.m), dtype=bool)
    for i, st in enumerate(sorted(sets, key=sorted)):
        rows[i, sorted(st)] = True
    return rows


def deadline_load(p: Problem, total: np.ndarray, lo: float) -> float:
    """The least makespan M ≥ ``lo`` passing the load test when task t may only use the
    devices j with ``total[t, j]`` ≤ M (see :func:`through`), by bisection.

    The test (work over speed, busy time over devices, on each set of :func:`_subsets`)
    only gets easier as M grows, so every M below the answer fails it.
    """
    if p.n == 0:
        return lo
    comp = np.array(p.comp, dtype=float)
    speed = np.array(p.dev_flops, dtype=float)
    work = comp * speed[None, :]
    sets = _subsets(p)
    cap_speed = sets @ speed
    cap_count = sets.sum(axis=1)

    def passes(m: float) -> bool:
        feas = total <= m
        if not feas.any(axis=1).all():
            return False
        w = np.where(feas, work, INF).min(axis=1)
        b = np.where(feas, comp, INF).min(axis=1)
        forced = ~(feas[None, :, :] & ~sets[:, None, :]).any(axis=2)
        return bool((forced @ w <= m * cap_speed).all()
                    and (forced @ b <= m * cap_count).all())

    if passes(lo):
        return lo
    hi = max(lo, 1e-12)
    while not passes(hi):
        lo, hi = hi, hi * 2
    for _ in range(40):
        mid = (lo + hi) / 2
        if passes(mid):
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    return lo


def load(p: Problem) -> float:
    """Work over speed and busy time over devices, on every device subset that matters."""
    work = [min(p.dev_flops[j] * p.comp[t][j] for j in p.allowed[t]) for t in range(p.n)]
    busy = [min(p.comp[t][j] for j in p.allowed[t]) for t in range(p.n)]
    subsets = {frozenset(range(p.m))} | {frozenset(a) for a in p.allowed}
    best = 0.0
    for s in subsets:
        inside = [t for t in range(p.n) if s.issuperset(p.allowed[t])]
        speed = sum(p.dev_flops[j] for j in s)
        best = max(best, sum(work[t] for t in inside) / speed,
                   sum(busy[t] for t in inside) / len(s))
    return best


def lower_bound(p: Problem, tp: bool = False, codecs: bool = True) -> float:
    """A makespan no feasible plan beats: the path, load and deadline-load bounds
    (see the module doc).

    ``tp``: the bound also holds for plans with tensor-parallel groups (it is weaker on
    splittable tasks). ``codecs``: it also holds for plans with codecs on cut edges
    (from ``p.codec_table``); pass False only to bound plans without codecs.
    """
    total = through(p, tp, codecs)
    path = float(total.min(axis=1).max()) if p.n else 0.0
    return deadline_load(p, total, max(path, load(p)))


def space_size(p: Problem) -> int:
    """The number of single-device assignments (before memory)."""
    return math.prod(len(a) for a in p.allowed)


def optimum(p: Problem, limit: int = 200_000) -> tuple[float, list[Group]]:
    """The best makespan over single-device plans in the default priority order, and its
    plan (see the module doc), by depth-first branch and bound.

    Tasks are placed in the simulator's order with its own :class:`ListScheduler`, so a
    placed task's times never change and the largest finish so far bounds the makespan
    from below. Raises :class:`InvalidInput` when the space holds more than ``limit``
    assignments and :class:`PlacementInfeasible` when no assignment fits in memory.
    """
    size = space_size(p)
    if size > limit:
        raise InvalidInput(f"optimum: {size} assignments exceed the limit {limit} "
                           f"({p.n} tasks, {p.m} devices)")
    order = p.default_order
    ls = ListScheduler(p)
    params = [0] * p.m
    peak = [0] * p.m
    act = [p.in_bytes[t] + p.out[t] for t in range(p.n)]
    # what must still run after a task ends: its longest chain of fastest successors
    tail = [0.0] * p.n
    after = [0.0] * p.n
    for t in reversed(p.topo):
        after[t] = max((tail[s] for s, _ in p.succs[t]), default=0.0)
        tail[t] = fastest(p, t) + after[t]
    best_ms = INF
    best: list[Group] = []

    def visit(k: int, so_far: float) -> None:
        nonlocal best_ms, best
        if k == len(order):
            if so_far < best_ms:
                best_ms, best = so_far, list(ls.groups)
            return
        t = order[k]
        options = []
        for j in p.allowed[t]:
            if params[j] + p.param[t] + max(peak[j], act[t]) > p.dev_mem[j]:
                continue
            st, en = ls.slot(t, (j,))
            options.append((en, st, j))
        options.sort()
        for en, st, j in options:
            if max(so_far, en + after[t]) >= best_ms:
                continue
            old_peak = peak[j]
            params[j] += p.param[t]
            peak[j] = max(old_peak, act[t])
            ls.place(t, (j,))
            visit(k + 1, max(so_far, en))
            ls.busy[j].remove((st, en))
            ls.groups[t] = ()
            params[j] -= p.param[t]
            peak[j] = old_peak

    visit(0, 0.0)
    if not best:
        raise PlacementInfeasible(f"optimum: no assignment of the {p.n} tasks fits in the "
                                  f"memory of devices {', '.join(p.dev_ids)}")
    return best_ms, best
