"""Problem: a task graph and a cluster compiled to index arrays for fast evaluation.

Policies and the simulator work on task and device *indices*; this module builds the
tables once (compute time of every task on every device, link latency and inverse
bandwidth between every pair, predecessor lists, the default priority order) and
converts between indices and ids. Pure: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from edgeswarm.placement.cluster import Cluster, DeviceId
from edgeswarm.placement.codecs import DEFAULT_CODECS, CodecSpec, codec
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.plan import EdgeKey, Plan
from edgeswarm.placement.taskgraph import TaskGraph, TaskId

INF = math.inf

#: A task's placement by index: one device, or a tensor-parallel group.
Group = tuple[int, ...]

#: The data plane's all-reduce algorithms (``DataPlane.all_reduce``), fewest message steps
#: first: the order ties are broken in.
ALLREDUCE_ALGORITHMS = ("direct", "star", "gloo")
#: The ones the planner prices a tensor-parallel group with (the GNN's features mirror them).
PLANNER_ALLREDUCE = ("star", "gloo")


def allreduce_times(group: Sequence[int], nbytes: float, lat: Sequence[Sequence[float]],
                    inv_bw: Sequence[Sequence[float]], hop_s: float = 0.0,
                    overhead_s: Mapping[str, float] | None = None) -> dict[str, float]:
    """Predicted seconds of each all-reduce algorithm over ``group`` (device indices into
    the ``lat``/``inv_bw`` tables) for a tensor of ``nbytes``.

    - "star": every member sends to ``group[0]`` (put the fastest first), which sends the
      sum back: two message steps.
    - "gloo" (a ring): reduce-scatter then all-gather, ``2 (k - 1)`` steps of ``1/k`` of
      the bytes over the slowest hop.
    - "direct": every member sends its part to every other: one step (links in parallel).

    ``hop_s`` is the software cost of one message step (the whole cost on an unshaped
    loopback, where latency and bandwidth terms are zero), so it counts the steps;
    ``overhead_s`` adds a measured cost per call of each algorithm instead (what the
    transport really spends beyond the links, e.g. gloo's ring runs on a worker thread).
    """
    k = len(group)
    if k < 2:
        return dict.fromkeys(ALLREDUCE_ALGORITHMS, 0.0)
    extra = overhead_s or {}
    root = group[0]
    up = max(lat[i][root] + nbytes * inv_bw[i][root] for i in group[1:])
    down = max(lat[root][i] + nbytes * inv_bw[root][i] for i in group[1:])
    chunk = nbytes / k
    hop = max(lat[group[i]][group[(i + 1) % k]] + chunk * inv_bw[group[i]][group[(i + 1) % k]]
              for i in range(k))
    each = max(lat[i][j] + nbytes * inv_bw[i][j] for i in group for j in group if i != j)
    return {"direct": each + hop_s + extra.get("direct", 0.0),
            "star": up + down + 2 * hop_s + extra.get("star", 0.0),
            "gloo": 2 * (k - 1) * (hop + hop_s) + extra.get("gloo", 0.0)}


def cheapest_allreduce(times: Mapping[str, float],
                       allowed: Sequence[str] = ALLREDUCE_ALGORITHMS) -> str:
    """The algorithm of ``times`` with the least predicted time (ties: fewer steps)."""
    return min((a for a in ALLREDUCE_ALGORITHMS if a in allowed),
               key=lambda a: (times[a], ALLREDUCE_ALGORITHMS.index(a)))


@dataclass
class Problem:
    graph: TaskGraph
    cluster: Cluster
    codec_table: Mapping[str, CodecSpec] = field(default_factory=lambda: DEFAULT_CODECS)

    def __post_init__(self) -> None:
        g, c = self.graph, self.cluster
        self.task_ids: list[TaskId] = [t.id for t in g.tasks]
        self.dev_ids: list[DeviceId] = c.ids
        self.t_index = {tid: i for i, tid in enumerate(self.task_ids)}
        self.d_index = {did: i for i, did in enumerate(self.dev_ids)}
        self.n, self.m = len(self.task_ids), len(self.dev_ids)
        self.dev_flops = [d.flops for d in c.devices]
        self.dev_mem = [d.memory_bytes for d in c.devices]
        self.flops = [t.flops for t in g.tasks]
        self.param = [t.param_bytes for t in g.tasks]
        self.out = [t.out_bytes for t in g.tasks]
        self.splittable = [t.splittable for t in g.tasks]
        self.comp: list[list[float]] = []
        self.allowed: list[list[int]] = []
        for t in g.tasks:
            allowed = set(t.devices) if t.devices is not None else None
            row = []
            for j, d in enumerate(c.devices):
                if allowed is not None and d.id not in allowed:
                    row.append(INF)
                elif t.compute_s is not None and d.id in t.compute_s:
                    row.append(float(t.compute_s[d.id]))
                else:
                    row.append(t.flops / self.dev_flops[j])
            self.comp.append(row)
            ok = [j for j, v in enumerate(row) if v < INF]
            if not ok:
                named = f" (it may only run on {', '.join(t.devices)})" if t.devices else ""
                raise PlacementInfeasible(
                    f"task {t.id!r} may run on no device of this cluster{named}")
            self.allowed.append(ok)
        self.preds: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]
        self.succs: list[list[tuple[int, int]]] = [[] for _ in range(self.n)]
        for e in g.edges:
            src, dst = self.t_index[e.src], self.t_index[e.dst]
            self.preds[dst].append((src, e.bytes))
            self.succs[src].append((dst, e.bytes))
        self.in_bytes = [sum(b for _, b in p) for p in self.preds]
        self.lat = [[0.0] * self.m for _ in range(self.m)]
        self.inv_bw = [[0.0] * self.m for _ in range(self.m)]
        for a, da in enumerate(self.dev_ids):
            for b, db in enumerate(self.dev_ids):
                if a != b:
                    spec = c.link(da, db)
                    self.lat[a][b] = spec.latency_s
                    self.inv_bw[a][b] = 1.0 / spec.bandwidth_Bps
        self._link_means: tuple[float, float] | None = None
        self.topo = [self.t_index[t] for t in g.topological_order()]
        self.rank = self._upward_rank()
        pos = {t: i for i, t in enumerate(self.topo)}
        # ranks equal up to rounding tie-break by topological position
        self.default_order = sorted(range(self.n),
                                    key=lambda t: (-float(f"{self.rank[t]:.12g}"), pos[t]))
        # codecs valid on a few edges only (a learned codec): edge -> those names
        self._only_on: dict[tuple[int, int], set[str]] = {}
        for name, codec_spec in self.codec_table.items():
            for first, then in codec_spec.edges or ():
                key = (self.t_index.get(TaskId(first), -1), self.t_index.get(TaskId(then), -1))
                self._only_on.setdefault(key, set()).add(name)
        self.calls = 0
        #: tables a policy derives from this problem, kept for the next step that needs
        #: them (re-planning and the GNN's search share one set)
        self.memo: dict[str, object] = {}

    # -- costs -------------------------------------------------------------------------
    def mean_comp(self, t: int) -> float:
        row = self.comp[t]
        ok = self.allowed[t]
        return sum(row[j] for j in ok) / len(ok)

    def mean_comm(self, nbytes: float) -> float:
        """HEFT's average communication cost: mean latency + bytes / mean bandwidth."""
        if self.m < 2:
            return 0.0
        if self._link_means is None:  # once: rank and OCT tables ask for every edge
            pairs = self.m * (self.m - 1)
            self._link_means = (
                sum(map(sum, self.lat)) / pairs,
                sum(1.0 / x for row in self.inv_bw for x in row if x > 0) / pairs)
        lat, bw = self._link_means
        return lat + nbytes / bw

    def _upward_rank(self) -> list[float]:
        rank = [0.0] * self.n
        for t in reversed(self.topo):
            best = 0.0
            for s, b in self.succs[t]:
                best = max(best, self.mean_comm(b) + rank[s])
            rank[t] = self.mean_comp(t) + best
        return rank

    def group_compute(self, t: int, group: Group) -> float:
        """Run time of task ``t`` over ``group``: work split in proportion to speed."""
        if len(group) == 1:
            return self.comp[t][group[0]]
        return 1.0 / sum(1.0 / self.comp[t][j] for j in group)

    def allreduce_s(self, group: Group, nbytes: float) -> float:
        """Joining the partial outputs of a tensor-parallel group: the cheapest of
        :data:`PLANNER_ALLREDUCE` (a star through the first member, a ring), as
        :func:`allreduce_times` predicts them."""
        if len(group) < 2:
            return 0.0
        times = allreduce_times(group, nbytes, self.lat, self.inv_bw)
        return times[cheapest_allreduce(times, PLANNER_ALLREDUCE)]

    def codec_allowed(self, name: str, src: int, dst: int) -> bool:
        """Whether codec ``name`` of the table may go on the edge ``src -> dst`` (indices):
        a codec restricted to some edges (:attr:`CodecSpec.edges`) is allowed there only."""
        spec = self.codec_table.get(name)
        if spec is None:
            return False
        return spec.edges is None or name in self._only_on.get((src, dst), ())

    # -- conversions ---------------------------------------------------------------------
    def groups_of(self, plan: Plan) -> list[Group]:
        missing = [t for t in self.task_ids if t not in plan.assignments]
        if missing:
            raise InvalidInput(f"plan: {len(missing)} task(s) not assigned: {missing[:5]}")
        extra = [t for t in plan.assignments if t not in self.t_index]
        if extra:
            raise InvalidInput(f"plan: assigns unknown task(s) {extra[:5]}")
        out: list[Group] = []
        for tid in self.task_ids:
            group = []
            for d in plan.assignments[tid]:
                if d not in self.d_index:
                    raise InvalidInput(f"plan: task {tid!r} is assigned to unknown device "
                                       f"{d!r}; the cluster has {', '.join(self.dev_ids)}")
                group.append(self.d_index[d])
            if len(set(group)) != len(group):
                raise InvalidInput(f"plan: task {tid!r} lists a device twice")
            out.append(tuple(group))
        return out

    def codecs_of(self, plan: Plan) -> dict[tuple[int, int], CodecSpec]:
        edges = {(self.t_index[e.src], self.t_index[e.dst]) for e in self.graph.edges}
        out: dict[tuple[int, int], CodecSpec] = {}
        for (src, dst), name in plan.codecs.items():
            key = (self.t_index.get(src, -1), self.t_index.get(dst, -1))
            if key not in edges:
                raise InvalidInput(f"plan: codec on {src}->{dst}, which is not an edge of "
                                   f"the graph")
            spec = codec(name, self.codec_table)
            self._check_edge(name, *key)
            if spec.ratio < 1.0 or spec.encode_flops_per_byte > 0:
                out[key] = spec
        return out

    def order_of(self, plan: Plan) -> list[int]:
        if plan.order is None:
            return self.default_order
        order = [self.t_index.get(t, -1) for t in plan.order]
        if sorted(order) != list(range(self.n)):
            raise InvalidInput("plan: 'order' must list every task exactly once")
        pos = {t: i for i, t in enumerate(order)}
        for t in range(self.n):
            for s, _ in self.succs[t]:
                if pos[s] < pos[t]:
                    raise InvalidInput(f"plan: 'order' puts {self.task_ids[s]!r} before its "
                                       f"predecessor {self.task_ids[t]!r}")
        return order

    def to_plan(self, groups: Sequence[Group], policy: str,
                codecs: Mapping[tuple[int, int], str] | None = None,
                order: Sequence[int] | None = None) -> Plan:
        assignments = {self.task_ids[t]: tuple(self.dev_ids[j] for j in g)
                       for t, g in enumerate(groups)}
        named: dict[EdgeKey, str] = {}
        for (s, d), name in (codecs or {}).items():
            if name != "none":
                self._check_edge(name, s, d)
                named[(self.task_ids[s], self.task_ids[d])] = name
        return Plan(assignments, named, policy,
                    tuple(self.task_ids[t] for t in order) if order is not None else None)

    def _check_edge(self, name: str, src: int, dst: int) -> None:
        if not self.codec_allowed(name, src, dst):
            spec = codec(name, self.codec_table)  # raises for an unknown name
            where = ", ".join(f"{a}->{b}" for a, b in sorted(spec.edges or ()))
            raise InvalidInput(f"plan: codec {name!r} on {self.task_ids[src]}->"
                               f"{self.task_ids[dst]}: it is valid on {where} only (a "
                               f"learned codec is trained for one cut)")
