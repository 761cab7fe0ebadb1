"""Shared instances for the placement policy tests: the two published worked examples
and a small seeded random instance builder."""

from collections.abc import Callable

import numpy as np
import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

Instance = tuple[TaskGraph, Cluster]

# Topcuoglu, Hariri and Wu (2002), Fig. 2: compute cost on (P1, P2, P3) and edge costs.
HEFT_COSTS = {
    1: (14, 16, 9), 2: (13, 19, 18), 3: (11, 13, 19), 4: (13, 8, 17), 5: (12, 13, 10),
    6: (13, 16, 9), 7: (7, 15, 11), 8: (5, 11, 14), 9: (18, 12, 20), 10: (21, 7, 16),
}
HEFT_EDGES = [(1, 2, 18), (1, 3, 12), (1, 4, 9), (1, 5, 11), (1, 6, 14), (2, 8, 19),
              (2, 9, 16), (3, 7, 23), (4, 8, 27), (4, 9, 23), (5, 9, 13), (6, 8, 15),
              (7, 10, 17), (8, 10, 11), (9, 10, 13)]

# Arabnejad and Barbosa (2014), the sample DAG of the PEFT paper: compute cost of T0..T9
# on (P0, P1, P2) and edge costs (unit bandwidth, no latency, as in the paper).
PEFT_COSTS = [(22, 21, 36), (22, 18, 18), (32, 27, 43), (7, 10, 4), (29, 27, 35),
              (26, 17, 24), (14, 25, 30), (29, 23, 36), (15, 21, 8), (13, 16, 33)]
PEFT_EDGES = [(0, 1, 17), (0, 2, 31), (0, 3, 29), (0, 4, 13), (0, 5, 7), (1, 7, 3),
              (1, 8, 30), (2, 6, 16), (3, 7, 11), (3, 8, 7), (4, 8, 57), (5, 7, 5),
              (6, 9, 9), (7, 9, 42), (8, 9, 7)]


def _table_instance(costs: list[tuple[int, ...]], edges: list[tuple[int, int, int]],
                    names: list[str], devices: list[str]) -> Instance:
    tasks = tuple(Task(TaskId(n), 1.0, 0, 0,
                       compute_s={d: float(c) for d, c in zip(devices, cs, strict=True)})
                  for n, cs in zip(names, costs, strict=True))
    es = tuple(Edge(TaskId(names[s]), TaskId(names[d]), b) for s, d, b in edges)
    cluster = Cluster(tuple(Device(DeviceId(d), 1.0, 1 << 30) for d in devices),
                      default_link=LinkSpec(1.0, 0.0))
    return TaskGraph(tasks, es), cluster


@pytest.fixture
def heft_paper() -> Instance:
    names = [f"n{i}" for i in HEFT_COSTS]
    index = {i: k for k, i in enumerate(HEFT_COSTS)}
    edges = [(index[s], index[d], b) for s, d, b in HEFT_EDGES]
    return _table_instance(list(HEFT_COSTS.values()), edges, names, ["p1", "p2", "p3"])


@pytest.fixture
def peft_paper() -> Instance:
    return _table_instance(PEFT_COSTS, PEFT_EDGES, [f"t{i}" for i in range(10)],
                           ["p0", "p1", "p2"])


def random_instance(seed: int, tasks: int = 24, devices: int = 6, typed: float = 0.2,
                    splittable: float = 0.0, memory: int = 1 << 30) -> Instance:
    """A layered random DAG on a heterogeneous cluster with two sites."""
    rng = np.random.default_rng(seed)
    levels = max(2, int(np.sqrt(tasks)))
    level = sorted(int(x) for x in rng.integers(0, levels, size=tasks))
    level[0] = 0
    dev_ids = [DeviceId(f"d{j}") for j in range(devices)]
    speed = [float(x) for x in rng.uniform(1e9, 8e9, size=devices)]
    ts = []
    for i in range(tasks):
        allowed = None
        if rng.uniform() < typed:
            allowed = tuple(d for d in dev_ids if rng.uniform() < 0.6) or (dev_ids[0],)
        ts.append(Task(TaskId(f"t{i}"), float(rng.uniform(1e8, 1e9)),
                       int(rng.integers(1 << 20, 1 << 24)), int(rng.integers(1e4, 1e6)),
                       splittable=bool(rng.uniform() < splittable), devices=allowed))
    edges = []
    for i in range(1, tasks):
        parents = [k for k in range(i) if level[k] < level[i]] or [0]
        for k in set(int(x) for x in rng.choice(parents, size=min(2, len(parents)))):
            edges.append(Edge(TaskId(f"t{k}"), TaskId(f"t{i}"), ts[k].out_bytes))
    site = [j % 2 for j in range(devices)]
    links = tuple(Link(dev_ids[a], dev_ids[b],
                       2e8 if site[a] == site[b] else 5e6,
                       1e-4 if site[a] == site[b] else 1e-2)
                  for a in range(devices) for b in range(a + 1, devices))
    cluster = Cluster(tuple(Device(d, s, memory) for d, s in zip(dev_ids, speed, strict=True)),
                      links)
    return TaskGraph(tuple(ts), tuple(edges)), cluster


@pytest.fixture
def make_instance() -> Callable[..., Instance]:
    return random_instance
