"""Seeded instance generators: layered random DAGs on heterogeneous edge clusters.

The DAGs follow the generator of the HEFT paper (Topcuoglu, Hariri and Wu 2002), which
GiPH (Hu et al., MLSys 2023) also uses:

- ``tasks`` v, shape ``alpha``: about sqrt(v)/alpha levels of about alpha·sqrt(v) tasks;
  level 0 holds the entry tasks, every later task has a parent one level up;
- ``out_degree``: each task has 1..out_degree children in later levels (mostly the next);
- ``ccr``: communication-to-computation ratio, the mean transfer time of an edge (mean
  latency + bytes × mean inverse bandwidth over device pairs) over the mean compute time
  of a task (over its allowed devices);
- ``beta``: cost heterogeneity; task t on device d takes flops/speed(d) × u with u
  uniform in [1 - beta/2, 1 + beta/2], written to ``Task.compute_s``. With beta = 0 the
  compute time is flops ÷ device speed, so a device that rejoins faster is faster;
- ``typed_frac``: the share of tasks that may only run on devices of some hardware types
  (``Task.devices``); ``task_types`` fixes how many types (GiPH: every task needs one).

Clusters are a pool of devices (log-uniform speeds and memories; one hardware type
each, or, with ``type_prob``, each type with that probability as in GiPH's device
networks) placed at ``sites``: links inside a site are fast and near, links across
sites slow and far. The graph and the cluster are drawn together as an :class:`Instance`, because a
task's allowed devices name device ids. Pure: every function takes a numpy Generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

#: Compute time of an average task (seconds) unless the latency asks for more (see ccr).
BASE_COMPUTE_S = 0.05

Params = Mapping[str, float | int | str]


@dataclass(frozen=True)
class DagParams:
    tasks: int = 30
    alpha: float = 1.0
    out_degree: int = 3
    ccr: float = 1.0
    beta: float = 0.5
    typed_frac: float = 0.0
    #: the hardware types a typed task may use one of (0: 1 to all but one, drawn)
    task_types: int = 0
    #: share of tasks (the heaviest) marked splittable, kind "linear" or "attention"
    splittable_frac: float = 0.0
    #: splittable tasks carry this many times the work of an average task
    heavy_factor: float = 1.0
    #: total parameter bytes as a share of the smallest device's memory
    mem_frac: float = 0.25

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise InvalidInput(f"generator: tasks must be >= 1, got {self.tasks}")
        if self.alpha <= 0 or self.out_degree < 1 or self.ccr <= 0:
            raise InvalidInput(f"generator: need alpha > 0, out_degree >= 1, ccr > 0; got "
                               f"{self.alpha}, {self.out_degree}, {self.ccr}")
        if not 0 <= self.beta <= 2:
            raise InvalidInput(f"generator: beta must be in [0, 2], got {self.beta}")
        for name in ("typed_frac", "splittable_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidInput(f"generator: {name} must be in [0, 1]")


@dataclass(frozen=True)
class ClusterParams:
    devices: int = 20
    flops: tuple[float, float] = (5e9, 2e11)
    memory_bytes: tuple[int, int] = (1 << 30, 16 << 30)
    bandwidth_Bps: tuple[float, float] = (1e6, 125e6)
    latency_s: tuple[float, float] = (1e-3, 30e-3)
    #: devices are spread over this many sites; 1: every link drawn over the full ranges
    sites: int = 1
    hw_types: int = 1
    #: 0: each device has one hardware type (every type on some device); > 0: each device
    #: supports each type with this probability (at least one; every type on some
    #: device), as GiPH's device networks do
    type_prob: float = 0.0
    #: list every pair's link; otherwise list links inside a site and give a default_link
    all_pairs: bool = True

    def __post_init__(self) -> None:
        if self.devices < 1 or self.sites < 1 or self.hw_types < 1:
            raise InvalidInput("generator: devices, sites and hw_types must be >= 1")
        if not 0 <= self.type_prob <= 1:
            raise InvalidInput(f"generator: type_prob must be in [0, 1], got {self.type_prob}")
        for name in ("flops", "memory_bytes", "bandwidth_Bps", "latency_s"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi or (name != "latency_s" and lo <= 0):
                raise InvalidInput(f"generator: bad range {name}={lo, hi}")


@dataclass(frozen=True)
class DevicePool:
    """Every device an instance may ever see (the dynamic suite removes and re-adds
    them), with its hardware type and the links between all of them."""

    devices: tuple[Device, ...]
    #: the hardware types each device supports
    types: Mapping[str, frozenset[str]]
    links: tuple[Link, ...]
    default_link: LinkSpec | None

    def cluster(self, ids: Iterable[str] | None = None,
                flops: Mapping[str, float] | None = None) -> Cluster:
        """The cluster of devices ``ids`` (default: all), speeds overridden by ``flops``."""
        keep = set(ids) if ids is not None else {d.id for d in self.devices}
        speeds = flops or {}
        devs = tuple(Device(d.id, float(speeds.get(d.id, d.flops)), d.memory_bytes, d.runtimes)
                     for d in self.devices if d.id in keep)
        links = tuple(ln for ln in self.links if ln.src in keep and ln.dst in keep)
        return Cluster(devs, links, self.default_link)


@dataclass(frozen=True)
class Instance:
    name: str
    graph: TaskGraph
    cluster: Cluster
    #: the drawn generator parameters (for reports and stratifying results)
    params: Params = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params),
                "graph": self.graph.to_json(), "cluster": self.cluster.to_json()}


# -- clusters --------------------------------------------------------------------------
def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi)))) if lo < hi else float(lo)


def random_pool(rng: np.random.Generator, cp: ClusterParams) -> DevicePool:
    """Devices d0..d{n-1} with speeds, memories, hardware types, sites and links."""
    n = cp.devices
    devices = tuple(Device(DeviceId(f"d{i}"), _loguniform(rng, *cp.flops),
                           int(_loguniform(rng, *cp.memory_bytes))) for i in range(n))
    types = _hardware_types(rng, [d.id for d in devices], cp)
    site = [int(s) for s in rng.integers(0, cp.sites, size=n)]
    bw_lo, bw_hi = cp.bandwidth_Bps
    lat_lo, lat_hi = cp.latency_s
    bw_mid, lat_mid = math.sqrt(bw_lo * bw_hi), (lat_lo + lat_hi) / 2
    links: list[Link] = []
    for a in range(n):
        for b in range(a + 1, n):
            if cp.sites == 1:
                bw, lat = _loguniform(rng, bw_lo, bw_hi), float(rng.uniform(lat_lo, lat_hi))
            elif site[a] == site[b]:
                bw, lat = _loguniform(rng, bw_mid, bw_hi), float(rng.uniform(lat_lo, lat_mid))
            elif cp.all_pairs:
                bw, lat = _loguniform(rng, bw_lo, bw_mid), float(rng.uniform(lat_mid, lat_hi))
            else:
                continue
            links.append(Link(devices[a].id, devices[b].id, bw, lat))
    default = None
    if not cp.all_pairs:
        default = LinkSpec(math.sqrt(bw_lo * bw_mid) if cp.sites > 1 else bw_mid,
                           (lat_mid + lat_hi) / 2 if cp.sites > 1 else lat_mid)
        if cp.sites == 1:
            links = []
    return DevicePool(devices, types, tuple(links), default)


def _hardware_types(rng: np.random.Generator, ids: list[str],
                    cp: ClusterParams) -> dict[str, frozenset[str]]:
    """The types each device supports; every type on some device when there are enough."""
    n, k = len(ids), cp.hw_types
    if cp.type_prob == 0:
        kinds = [i % k for i in range(n)]
        rng.shuffle(kinds)
        return {d: frozenset({f"hw{x}"}) for d, x in zip(ids, kinds, strict=True)}
    has = rng.uniform(size=(n, k)) < cp.type_prob
    for i in np.nonzero(~has.any(axis=1))[0].tolist():
        has[i, int(rng.integers(k))] = True
    for x in np.nonzero(~has.any(axis=0))[0].tolist():
        if n >= k:
            has[int(rng.integers(n)), x] = True
    return {d: frozenset(f"hw{x}" for x in np.nonzero(has[i])[0].tolist())
            for i, d in enumerate(ids)}


def _link_means(pool: DevicePool) -> tuple[float, float]:
    """Mean latency and mean inverse bandwidth over ordered pairs of distinct devices."""
    c = pool.cluster()
    ids = c.ids
    if len(ids) < 2:
        return 0.0, 0.0
    specs = [c.link(a, b) for a in ids for b in ids if a != b]
    return (sum(s.latency_s for s in specs) / len(specs),
            sum(1.0 / s.bandwidth_Bps for s in specs) / len(specs))


# -- graphs --------------------------------------------------------------------------
def random_layers(rng: np.random.Generator, v: int, alpha: float) -> list[list[int]]:
    """Task indices by level: about sqrt(v)/alpha levels, at least 2 when v >= 2."""
    height = max(1, round(math.sqrt(v) / alpha * float(rng.uniform(0.75, 1.25))))
    height = min(v, max(height, 2 if v >= 2 else 1))
    widths = [1 + int(x) for x in rng.multinomial(v - height, [1.0 / height] * height)]
    layers, k = [], 0
    for w in widths:
        layers.append(list(range(k, k + w)))
        k += w
    return layers


def random_edges(rng: np.random.Generator, layers: list[list[int]],
                 out_degree: int) -> list[tuple[int, int]]:
    """Edges of a connected layered DAG: every task below level 0 has a parent one level
    up, every task above the last level has 1..out_degree children (mostly next level)."""
    level = {t: lv for lv, ts in enumerate(layers) for t in ts}
    edges: set[tuple[int, int]] = set()
    for lv, ts in enumerate(layers[:-1]):
        later = [t for ts2 in layers[lv + 1:] for t in ts2]
        weights = np.array([4.0 ** -(level[t] - lv - 1) for t in later])
        for u in ts:
            k = min(int(rng.integers(1, out_degree + 1)), len(later))
            for x in rng.choice(len(later), size=k, replace=False, p=weights / weights.sum()):
                edges.add((u, later[int(x)]))
    for lv in range(1, len(layers)):
        for t in layers[lv]:
            if not any((u, t) in edges for u in layers[lv - 1]):
                edges.add((layers[lv - 1][int(rng.integers(len(layers[lv - 1])))], t))
    # join the weak components to the one holding task 0
    parent = list(range(sum(map(len, layers))))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, w in edges:
        parent[find(u)] = find(w)
    for t in range(len(parent)):
        if find(t) != find(0) and level[t] > 0:
            edges.add((layers[0][int(rng.integers(len(layers[0])))], t))
            parent[find(t)] = find(0)
    return sorted(edges)


def random_graph(rng: np.random.Generator, dp: DagParams, pool: DevicePool,
                 name: str = "") -> TaskGraph:
    """A layered DAG whose costs are calibrated on ``pool`` (see the module doc)."""
    v = dp.tasks
    layers = random_layers(rng, v, dp.alpha)
    pairs = random_edges(rng, layers, dp.out_degree)
    ids = [TaskId(f"t{i}") for i in range(v)]
    type_names = sorted(set().union(*pool.types.values()))
    allowed: list[tuple[str, ...] | None] = []
    for _ in range(v):
        if len(type_names) > 1 and rng.uniform() < dp.typed_frac:
            k = min(dp.task_types, len(type_names)) or int(rng.integers(1, len(type_names)))
            chosen = {str(x) for x in rng.choice(type_names, size=k, replace=False)}
            allowed.append(tuple(d.id for d in pool.devices if pool.types[d.id] & chosen))
        else:
            allowed.append(None)
    # work: HEFT draws uniform in [0, 2w]; we keep it off zero
    work = rng.uniform(0.2, 1.8, size=v)
    n_split = round(dp.splittable_frac * v)
    split = set(int(i) for i in np.argsort(-work, kind="stable")[:n_split])
    for i in split:
        work[i] *= dp.heavy_factor
    lat, ibw = _link_means(pool)
    target = max(BASE_COMPUTE_S, 2 * lat / dp.ccr) if lat > 0 else BASE_COMPUTE_S
    inv_speed: dict[str, float] = {d.id: 1.0 / d.flops for d in pool.devices}
    all_ids: tuple[str, ...] = tuple(d.id for d in pool.devices)

    def mean_inv(i: int) -> float:
        ok = allowed[i] or all_ids
        return sum(inv_speed[d] for d in ok) / len(ok)

    # scale so that the mean compute time over tasks and allowed devices is `target`
    scale = target * v / sum(float(work[i]) * mean_inv(i) for i in range(v))
    flops = [float(work[i]) * scale for i in range(v)]
    comm = dp.ccr * target
    out_bytes = [int(max(0.0, float(rng.uniform(0.5, 1.5)) * comm - lat) / ibw) if ibw > 0
                 else int(rng.uniform(0.5, 1.5) * 1e6) for _ in range(v)]
    min_mem = min(d.memory_bytes for d in pool.devices)
    total_work = float(work.sum())
    tasks = []
    for i in range(v):
        compute_s = None
        if dp.beta > 0:
            ok = allowed[i] or all_ids
            spread = rng.uniform(1 - dp.beta / 2, 1 + dp.beta / 2, size=len(ok))
            compute_s = {d: flops[i] * inv_speed[d] * float(u)
                         for d, u in zip(ok, spread, strict=True)}
        kind = str(rng.choice(["linear", "attention"])) if i in split else "other"
        tasks.append(Task(ids[i], flops[i], int(dp.mem_frac * min_mem * work[i] / total_work),
                          out_bytes[i], kind=kind, splittable=i in split,
                          devices=allowed[i], compute_s=compute_s))
    edges = tuple(Edge(ids[u], ids[w], out_bytes[u]) for u, w in pairs)
    return TaskGraph(tuple(tasks), edges, name=name)


def random_instance(rng: np.random.Generator, dp: DagParams, cp: ClusterParams,
                    name: str = "") -> Instance:
    """A graph and the cluster of its whole device pool."""
    pool = random_pool(rng, cp)
    graph = random_graph(rng, dp, pool, name)
    return Instance(name, graph, pool.cluster(), params=describe(dp, cp))


def describe(dp: DagParams, cp: ClusterParams) -> dict[str, float | int | str]:
    return {"tasks": dp.tasks, "alpha": dp.alpha, "out_degree": dp.out_degree, "ccr": dp.ccr,
            "beta": dp.beta, "typed_frac": dp.typed_frac, "task_types": dp.task_types,
            "splittable_frac": dp.splittable_frac, "devices": cp.devices,
            "sites": cp.sites, "hw_types": cp.hw_types, "type_prob": cp.type_prob}


# -- real graphs -------------------------------------------------------------------------
#: Edge clusters for the zoo's real graphs: a few phones, boards and laptops.
EDGE_CLUSTER = ClusterParams(devices=4, memory_bytes=(2 << 30, 16 << 30), sites=2)


def on_sampled_clusters(graph: TaskGraph, rng: np.random.Generator, n: int,
                        devices: tuple[int, int] = (2, 8)) -> list[Instance]:
    """``graph`` (e.g. a zoo model's extracted graph) on ``n`` sampled edge clusters of
    ``devices`` (low, high) devices. Memories are raised where needed so that the model
    fits: the largest device holds any one task, all devices together hold it twice."""
    if n < 0 or not 1 <= devices[0] <= devices[1]:
        raise InvalidInput(f"generator: bad n={n} or devices={devices}")
    need_one = max((t.param_bytes + t.out_bytes + sum(e.bytes for e in graph.predecessors(t.id))
                    for t in graph.tasks), default=0)
    act = max((t.out_bytes for t in graph.tasks), default=0)
    need_all = 2 * (graph.total_param_bytes + act)
    out = []
    for k in range(n):
        m = int(rng.integers(devices[0], devices[1] + 1))
        cp = ClusterParams(devices=m, memory_bytes=EDGE_CLUSTER.memory_bytes,
                           sites=min(m, EDGE_CLUSTER.sites))
        pool = random_pool(rng, cp)
        devs = list(pool.devices)
        total = sum(d.memory_bytes for d in devs)
        grow = max(1.0, need_all / total) if total else 1.0
        devs = [Device(d.id, d.flops, int(d.memory_bytes * grow)) for d in devs]
        big = max(range(m), key=lambda j: devs[j].memory_bytes)
        if devs[big].memory_bytes < need_one:
            devs[big] = Device(devs[big].id, devs[big].flops, int(need_one * 1.2))
        cluster = Cluster(tuple(devs), pool.links, pool.default_link)
        name = f"{graph.name or 'graph'}-c{k}"
        out.append(Instance(name, graph, cluster, params={"devices": m, "sites": cp.sites}))
    return out
