"""Static arrays of one problem, and the transfer-cost helpers the features and moves share.

Built once per solve from a :class:`Problem`: compute times as an ``n × m`` array,
links as ``m × m`` arrays, edges as parallel arrays, the (task, device) *options* the
policy chooses among, and the codec table as arrays. Everything that depends on the
current plan lives in :mod:`.features`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgeswarm.placement.problem import Group, Problem

FloatArray = np.ndarray
IntArray = np.ndarray


@dataclass
class Tables:
    p: Problem
    comp: FloatArray        # n × m seconds, inf where not allowed
    allowed: np.ndarray     # n × m bool
    mean_comp: FloatArray   # n
    lat: FloatArray         # m × m
    ibw: FloatArray         # m × m
    flops: FloatArray       # m
    mem: FloatArray         # m
    param: FloatArray       # n
    act: FloatArray         # n: input + output activation bytes
    out: FloatArray         # n
    rank: FloatArray        # n: HEFT upward rank
    splittable: np.ndarray  # n bool: may form a tensor-parallel group
    es: IntArray            # E: edge source task
    ev: IntArray            # E: edge destination task
    eb: FloatArray          # E: bytes
    opt_t: IntArray         # O: option task
    opt_d: IntArray         # O: option device
    opt_id: IntArray        # n × m: option index, -1 where not allowed
    opt_flat: IntArray      # O: t * m + d, to gather an n × m array at every option
    log_rel: FloatArray     # O: log of compute time on d over the task's mean
    log_speed: FloatArray   # m: log of speed over the mean speed
    succ_edges: list[list[tuple[int, int]]]  # per task: (successor, edge index)
    into: Segments          # edges by destination task
    out_of: Segments        # edges by source task
    edge_index: dict[tuple[int, int], int]
    codec_names: list[str]
    ratio: FloatArray       # C
    enc: FloatArray         # C: FLOPs per byte
    dec: FloatArray         # C
    valid: np.ndarray       # E × C bool: the codec may go on the edge (CodecSpec.edges)
    _costs: dict[bool, tuple[FloatArray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def of(cls, p: Problem) -> Tables:
        """The tables of ``p``, built once per problem (kept in ``p.memo``)."""
        tables = p.memo.get("gnn.tables")
        if not isinstance(tables, Tables):
            tables = p.memo["gnn.tables"] = cls._build(p)
        return tables

    @classmethod
    def _build(cls, p: Problem) -> Tables:
        comp = np.array(p.comp, dtype=np.float64).reshape(p.n, p.m)
        allowed = np.isfinite(comp)
        edges = [(s, d, b) for s in range(p.n) for d, b in p.succs[s]]
        es = np.array([e[0] for e in edges], dtype=np.int64)
        ev = np.array([e[1] for e in edges], dtype=np.int64)
        eb = np.array([e[2] for e in edges], dtype=np.float64)
        opt_t, opt_d = np.nonzero(allowed)
        opt_id = np.full((p.n, p.m), -1, dtype=np.int64)
        opt_id[opt_t, opt_d] = np.arange(len(opt_t))
        names = list(p.codec_table)
        specs = [p.codec_table[c] for c in names]
        mean_comp = np.array([p.mean_comp(t) for t in range(p.n)])
        flops = np.array(p.dev_flops, dtype=np.float64)
        succ_edges: list[list[tuple[int, int]]] = [[] for _ in range(p.n)]
        for e, (s, d, _) in enumerate(edges):
            succ_edges[s].append((d, e))
        return cls(
            p=p, comp=comp, allowed=allowed,
            mean_comp=mean_comp,
            lat=np.array(p.lat, dtype=np.float64).reshape(p.m, p.m),
            ibw=np.array(p.inv_bw, dtype=np.float64).reshape(p.m, p.m),
            flops=flops,
            mem=np.array(p.dev_mem, dtype=np.float64),
            param=np.array(p.param, dtype=np.float64),
            act=np.array([p.in_bytes[t] + p.out[t] for t in range(p.n)], dtype=np.float64),
            out=np.array(p.out, dtype=np.float64),
            rank=np.array(p.rank, dtype=np.float64),
            # a task that takes no time gains nothing from a group (and would divide by 0)
            splittable=np.array(p.splittable, dtype=bool)
            & np.where(allowed, comp > 0, True).all(axis=1),
            es=es, ev=ev, eb=eb, opt_t=opt_t, opt_d=opt_d, opt_id=opt_id,
            opt_flat=opt_t * p.m + opt_d,
            log_rel=np.clip(np.log(np.maximum(comp[opt_t, opt_d], 1e-12)
                                   / np.maximum(mean_comp[opt_t], 1e-12)), -5, 5),
            log_speed=np.log(flops / flops.mean()), succ_edges=succ_edges,
            into=Segments.of(ev, p.n), out_of=Segments.of(es, p.n),
            edge_index={(s, d): i for i, (s, d, _) in enumerate(edges)},
            codec_names=names,
            ratio=np.array([c.ratio for c in specs]),
            enc=np.array([c.encode_flops_per_byte for c in specs]),
            dec=np.array([c.decode_flops_per_byte for c in specs]),
            valid=np.array([[p.codec_allowed(c, s, d) for c in names] for s, d, _ in edges],
                           dtype=bool).reshape(len(edges), len(names)),
        )

    @property
    def n(self) -> int:
        return self.p.n

    @property
    def m(self) -> int:
        return self.p.m

    # -- transfer costs ----------------------------------------------------------------
    def edge_costs(self, use_codecs: bool) -> tuple[FloatArray, np.ndarray]:
        """``E × m × m``: seconds to carry edge e's bytes from device q to device j (0 when
        q == j), with the cheapest codec when ``use_codecs``; and that codec's index into
        :attr:`codec_names` (-1: none). Computed once per problem."""
        if use_codecs not in self._costs:
            m = self.m
            b = self.eb[:, None, None]
            cost = self.lat[None] + b * self.ibw[None]
            pick = np.full(cost.shape, -1, dtype=np.int8)
            if use_codecs:
                for c in range(len(self.ratio)):
                    with_c = (b * self.enc[c] / self.flops[None, :, None] + self.lat[None]
                              + b * self.ratio[c] * self.ibw[None]
                              + b * self.dec[c] / self.flops[None, None, :])
                    better = (with_c < cost) & self.valid[:, c, None, None]
                    cost = np.where(better, with_c, cost)
                    pick[better] = c
            diag = np.arange(m)
            cost[:, diag, diag] = 0.0
            pick[:, diag, diag] = -1
            self._costs[use_codecs] = (cost, pick)
        return self._costs[use_codecs]

    def link_cost(self, src: IntArray, use_codecs: bool) -> FloatArray:
        """``E × m``: seconds to carry each edge's bytes from device ``src[e]`` to each
        device."""
        cost, _ = self.edge_costs(use_codecs)
        out: FloatArray = cost[np.arange(len(src)), src, :]
        return out

    def link_cost_to(self, dst: IntArray, use_codecs: bool) -> FloatArray:
        """``E × m``: seconds to carry each edge's bytes from each device to ``dst[e]``."""
        cost, _ = self.edge_costs(use_codecs)
        out: FloatArray = cost[np.arange(len(dst)), :, dst]
        return out

    def best_codec(self, s: int, d: int, groups: Sequence[Group]) -> str:
        """The codec that delivers edge ``s -> d`` soonest under ``groups`` ("none" when
        the data is already where it is needed)."""
        gs, gd = groups[s], groups[d]
        if set(gd) <= set(gs):
            return "none"
        e = self.edge_index[(s, d)]
        if len(gs) == 1 and len(gd) == 1:
            c = int(self.edge_costs(True)[1][e, gs[0], gd[0]])
            return self.codec_names[c] if c >= 0 else "none"
        nbytes = float(self.eb[e])
        best, best_name = np.inf, "none"
        for c, name in enumerate(self.codec_names):
            if not self.valid[e, c]:
                continue
            worst = 0.0
            for j in gd:
                if j in gs:
                    continue
                arrive = min(nbytes * self.enc[c] / self.flops[q] + self.lat[q, j]
                             + nbytes * self.ratio[c] * self.ibw[q, j]
                             + nbytes * self.dec[c] / self.flops[j] for q in gs)
                worst = max(worst, arrive)
            if worst < best - 1e-15:
                best, best_name = worst, name
        return best_name


def member_matrix(m: int, reps: np.ndarray) -> np.ndarray:
    """``n × m`` bool: device ``j`` is in the group of task ``t`` (from :func:`reps`)."""
    out = np.zeros((len(reps), m), dtype=bool)
    out[np.arange(len(reps))[:, None], reps] = True
    return out


def reps(groups: Sequence[Group]) -> np.ndarray:
    """``n × k``: each group's members, padded with its first member (k = largest group)."""
    k = max(map(len, groups))
    if k == 1:
        return np.array([g[0] for g in groups], dtype=np.int64)[:, None]
    return np.array([list(g) + [g[0]] * (k - len(g)) for g in groups], dtype=np.int64)


@dataclass
class Segments:
    """Edges grouped by one end, for per-task max and sum over them without ufunc.at."""

    perm: IntArray      # edges sorted by task
    starts: IntArray    # first position of each task that has edges
    tasks: IntArray     # those tasks
    incidence: FloatArray  # n × E: 1 where the edge belongs to the task

    @classmethod
    def of(cls, end: IntArray, n: int) -> Segments:
        perm = np.argsort(end, kind="stable")
        tasks, starts = np.unique(end[perm], return_index=True)
        inc = np.zeros((n, len(end)))
        inc[end, np.arange(len(end))] = 1.0
        return cls(perm, starts, tasks, inc)

    def max(self, values: FloatArray, floor: FloatArray) -> FloatArray:
        """Per task, the max of ``floor`` and ``values`` over its edges (rows of values)."""
        out = floor.copy()
        if len(self.perm):
            red = np.maximum.reduceat(values[self.perm], self.starts, axis=0)
            out[self.tasks] = np.maximum(out[self.tasks], red)
        return out

    def sum(self, values: FloatArray) -> FloatArray:
        out: FloatArray = self.incidence @ values
        return out

