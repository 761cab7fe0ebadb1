"""Benchmark suites: seeded families of instances, and the training distribution.

- ``giph_grid``: GiPH's test settings: 10–50 tasks over the grid of the HEFT generator
  (CCR 0.1–10, shape 0.5–2, heterogeneity 0.1–1, hardware types), on 20 devices for
  even instances and 15–24 devices for odd ones (clusters never seen in training).
- ``headroom``: 50–100 tasks on 8–16 devices at 2–4 sites, CCR 5–10 and heterogeneity
  0.5–1: communication-bound, where HEFT's greedy choices cost the most.
- ``tiny``: ≤ 8 tasks on 2–3 devices, small enough for :func:`bounds.optimum`.
- ``tp``: headroom-like instances whose heaviest tasks are splittable.
- ``dynamic``: 20–50 tasks on 20 devices followed by 20 leave/join events.
- ``speed``: headroom draws of exactly 50 tasks on 16 devices, the size the decision-time
  target is set for.

Evaluation instance ``i`` of a suite is drawn from ``default_rng((EVAL_SEED_BASE + i,
suite number, seed))``; training draws from ``default_rng(TRAIN_SEED_BASE + k)``, whose
seeds the evaluation ones never reach.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from edgeswarm.placement.cluster import Cluster, DeviceId
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.generators import (
    ClusterParams,
    DagParams,
    DevicePool,
    Instance,
    Params,
    describe,
    random_graph,
    random_pool,
)
from edgeswarm.placement.taskgraph import TaskGraph

SUITES = ("giph_grid", "headroom", "tiny", "dynamic", "tp", "speed")
#: The suites whose settings the shipped checkpoint was trained on ("speed" only fixes
#: the size of headroom-like draws, so it adds nothing to learn from).
TRAINED_ON = SUITES[:5]
DEFAULT_N = 100
EVAL_SEED_BASE = 0
TRAIN_SEED_BASE = 1_000_000
EVENTS = 20

GIPH_TASKS = (10, 20, 30, 40, 50)
GIPH_CCR = (0.1, 0.5, 1.0, 5.0, 10.0)
GIPH_ALPHA = (0.5, 1.0, 2.0)
GIPH_BETA = (0.1, 0.25, 0.5, 0.75, 1.0)
#: GiPH's device networks: speeds and per-byte link costs within ±40% of their means,
#: per-pair latency uniform in [0, 2 × mean], 5 hardware types each device supports
#: with probability 0.2 (and at least one), every task needing one type
GIPH_NETWORK = ClusterParams(devices=20, flops=(3e10, 7e10),
                             bandwidth_Bps=(12.5e6 / 1.4, 12.5e6 / 0.6), latency_s=(0.0, 0.02),
                             hw_types=5, type_prob=0.2)
#: (tasks, devices) of the "speed" suite
SPEED_SIZE = (50, 16)

Draw = tuple[DagParams, ClusterParams]


@dataclass(frozen=True)
class Change:
    """One dynamic event: devices that left, or that rejoined (with new speeds)."""

    kind: str  # "leave" | "join"
    devices: tuple[DeviceId, ...]


@dataclass(frozen=True)
class DynamicInstance:
    name: str
    graph: TaskGraph
    #: the cluster before any event (all 20 devices)
    cluster: Cluster
    #: the cluster after each event, in order
    events: tuple[Cluster, ...]
    changes: tuple[Change, ...]
    params: Params = field(default_factory=dict)


def _pick(rng: np.random.Generator, options: tuple[float, ...]) -> float:
    return float(options[int(rng.integers(len(options)))])


def _giph(rng: np.random.Generator, i: int) -> Draw:
    devices = 20 if i % 2 == 0 else int(rng.integers(15, 25))
    dp = DagParams(tasks=GIPH_TASKS[i % 5], ccr=GIPH_CCR[(i // 5) % 5],
                   alpha=_pick(rng, GIPH_ALPHA), out_degree=int(rng.integers(1, 6)),
                   beta=_pick(rng, GIPH_BETA), typed_frac=1.0, task_types=1)
    return dp, GIPH_NETWORK if devices == 20 else replace(GIPH_NETWORK, devices=devices)


def _headroom(rng: np.random.Generator, i: int) -> Draw:
    dp = DagParams(tasks=int(rng.integers(50, 101)), ccr=_pick(rng, (5.0, 10.0)),
                   alpha=_pick(rng, GIPH_ALPHA), out_degree=int(rng.integers(2, 6)),
                   beta=float(rng.uniform(0.5, 1.0)), typed_frac=0.1)
    return dp, ClusterParams(devices=int(rng.integers(8, 17)), sites=int(rng.integers(2, 5)),
                             hw_types=2)


def _tiny(rng: np.random.Generator, i: int) -> Draw:
    dp = DagParams(tasks=int(rng.integers(3, 9)), ccr=_pick(rng, GIPH_CCR),
                   alpha=_pick(rng, GIPH_ALPHA), out_degree=int(rng.integers(1, 4)),
                   beta=_pick(rng, GIPH_BETA), typed_frac=0.2)
    return dp, ClusterParams(devices=int(rng.integers(2, 4)), hw_types=int(rng.integers(1, 3)))


def _tp(rng: np.random.Generator, i: int) -> Draw:
    dp = DagParams(tasks=int(rng.integers(50, 101)), ccr=_pick(rng, (1.0, 2.0, 5.0)),
                   alpha=_pick(rng, GIPH_ALPHA), out_degree=int(rng.integers(2, 6)),
                   beta=float(rng.uniform(0.5, 1.0)), typed_frac=0.1,
                   splittable_frac=float(rng.uniform(0.15, 0.3)),
                   heavy_factor=float(rng.uniform(3.0, 6.0)))
    return dp, ClusterParams(devices=int(rng.integers(8, 17)), sites=int(rng.integers(2, 5)),
                             hw_types=2)


def _speed(rng: np.random.Generator, i: int) -> Draw:
    dp, cp = _headroom(rng, i)
    return replace(dp, tasks=SPEED_SIZE[0]), replace(cp, devices=SPEED_SIZE[1])


def _dynamic(rng: np.random.Generator, i: int) -> Draw:
    # beta = 0: compute is flops / speed, so a device that rejoins faster is faster
    dp = DagParams(tasks=int(rng.integers(20, 51)), ccr=_pick(rng, (0.5, 1.0, 5.0)),
                   alpha=_pick(rng, GIPH_ALPHA), out_degree=int(rng.integers(1, 6)),
                   beta=0.0, typed_frac=0.1)
    # links inside a site listed, a default_link across sites (keeps 20 clusters cheap)
    return dp, ClusterParams(devices=20, sites=int(rng.integers(2, 5)), hw_types=2,
                             all_pairs=False)


DRAWS: dict[str, Callable[[np.random.Generator, int], Draw]] = {
    "giph_grid": _giph, "headroom": _headroom, "tiny": _tiny, "dynamic": _dynamic, "tp": _tp,
    "speed": _speed}


def _check(suite: str, n: int | None) -> int:
    if suite not in DRAWS:
        raise InvalidInput(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    n = DEFAULT_N if n is None else n
    if not 0 <= n <= TRAIN_SEED_BASE - EVAL_SEED_BASE:
        raise InvalidInput(f"suite {suite!r}: n must be in [0, "
                           f"{TRAIN_SEED_BASE - EVAL_SEED_BASE}], got {n}")
    return n


def instance_rng(suite: str, i: int, seed: int = 0) -> np.random.Generator:
    """The generator evaluation instance ``i`` of ``suite`` is drawn from."""
    return np.random.default_rng((EVAL_SEED_BASE + i, SUITES.index(suite), seed))


def _draw(suite: str, rng: np.random.Generator, i: int, name: str) -> tuple[Instance, DevicePool]:
    dp, cp = DRAWS[suite](rng, i)
    pool = random_pool(rng, cp)
    graph = random_graph(rng, dp, pool, name)
    return Instance(name, graph, pool.cluster(), params={"suite": suite, **describe(dp, cp)}), pool


def build(suite: str, n: int | None = None, seed: int = 0) -> list[Instance]:
    """``n`` (default 100) instances of ``suite``; for "dynamic", the starting clusters
    (:func:`build_dynamic` adds the events)."""
    n = _check(suite, n)
    return [_draw(suite, instance_rng(suite, i, seed), i, f"{suite}-{seed}-{i:03d}")[0]
            for i in range(n)]


def build_dynamic(n: int | None = None, seed: int = 0) -> list[DynamicInstance]:
    """``n`` (default 100) dynamic instances: 20 devices, then :data:`EVENTS` events."""
    n = _check("dynamic", n)
    out = []
    for i in range(n):
        rng = instance_rng("dynamic", i, seed)
        inst, pool = _draw("dynamic", rng, i, f"dynamic-{seed}-{i:03d}")
        events, changes = _events(rng, inst.graph, pool)
        out.append(DynamicInstance(inst.name, inst.graph, inst.cluster, events, changes,
                                   inst.params))
    return out


def _events(rng: np.random.Generator, graph: TaskGraph, pool: DevicePool,
            count: int = EVENTS) -> tuple[tuple[Cluster, ...], tuple[Change, ...]]:
    """Each event removes 2 or 4 present devices, or re-adds 2 or 4 removed ones with new
    speeds (×0.5–2 of their first); every task keeps a device it may run on, and at
    least 4 devices stay."""
    base: dict[str, float] = {d.id: d.flops for d in pool.devices}
    speeds: dict[str, float] = dict(base)
    present = [d.id for d in pool.devices]
    gone: list[DeviceId] = []
    allowed = [set(t.devices) for t in graph.tasks if t.devices is not None]
    clusters, changes = [], []
    for _ in range(count):
        k = 2 if rng.uniform() < 0.5 else 4
        leave = None
        if not gone or rng.uniform() < 0.5:
            leave = _removable(rng, present, allowed, k) or _removable(rng, present, allowed, 2)
        if leave is None and not gone:
            raise InvalidInput(f"dynamic: no 2 devices of {present} can leave without "
                               f"stranding a task")
        if leave is not None:
            present = [d for d in present if d not in leave]
            gone += sorted(leave)
            change = Change("leave", tuple(sorted(leave)))
        else:
            back = [DeviceId(str(d)) for d in
                    rng.choice(gone, size=min(k, len(gone)), replace=False)]
            for d in back:
                speeds[d] = base[d] * float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
            gone = [d for d in gone if d not in back]
            present += back
            change = Change("join", tuple(sorted(back)))
        clusters.append(pool.cluster(present, speeds))
        changes.append(change)
    return tuple(clusters), tuple(changes)


def _removable(rng: np.random.Generator, present: list[DeviceId], allowed: list[set[str]],
               k: int) -> set[DeviceId] | None:
    """``k`` devices whose leaving keeps 4 devices and a device for every task."""
    if len(present) - k < 4:
        return None
    for _try in range(20):
        pick = {DeviceId(str(d)) for d in rng.choice(present, size=k, replace=False)}
        left = set(present) - pick
        if all(a & left for a in allowed):
            return pick
    return None


# -- training ---------------------------------------------------------------------------
def training_rng(k: int) -> np.random.Generator:
    """The generator of training draw ``k`` (disjoint from every evaluation seed)."""
    return np.random.default_rng(TRAIN_SEED_BASE + k)


def _between(rng: np.random.Generator, i: int) -> Draw:
    """Sizes and settings in between the suites, drawn continuously."""
    split = rng.uniform() < 0.3
    dp = DagParams(tasks=int(np.exp(rng.uniform(np.log(3), np.log(100)))),
                   ccr=float(np.exp(rng.uniform(np.log(0.1), np.log(10)))),
                   alpha=float(np.exp(rng.uniform(np.log(0.5), np.log(2)))),
                   out_degree=int(rng.integers(1, 6)), beta=float(rng.uniform(0.0, 1.0)),
                   typed_frac=float(rng.uniform(0, 0.3)),
                   splittable_frac=float(rng.uniform(0.1, 0.3)) if split else 0.0,
                   heavy_factor=float(rng.uniform(1.0, 6.0)) if split else 1.0)
    return dp, ClusterParams(devices=int(rng.integers(2, 25)), sites=int(rng.integers(1, 5)),
                             hw_types=int(rng.integers(1, 4)),
                             all_pairs=bool(rng.uniform() < 0.7))


def sample_training(rng: np.random.Generator) -> Instance:
    """One training instance from the union of the suites' distributions: half the time
    a suite's own settings (for "dynamic", the cluster after 0–5 leave/join events),
    half the time settings in between. Pass :func:`training_rng` (k) for draw k."""
    which = TRAINED_ON[int(rng.integers(len(TRAINED_ON)))] if rng.uniform() < 0.5 else "between"
    draw = _between if which == "between" else DRAWS[which]
    dp, cp = draw(rng, int(rng.integers(0, 1 << 30)))
    pool = random_pool(rng, cp)
    graph = random_graph(rng, dp, pool, f"train-{which}")
    cluster = pool.cluster()
    if which == "dynamic":  # a cluster some leave/join events later
        events, _ = _events(rng, graph, pool, int(rng.integers(0, 6)))
        cluster = events[-1] if events else cluster
    return Instance(f"train-{which}", graph, cluster,
                    params={"suite": which, **describe(dp, cp)})
