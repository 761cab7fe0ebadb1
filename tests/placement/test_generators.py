"""Instance generators: seeded, valid, and with the parameters they were asked for."""

import json
import math
import statistics

import numpy as np
import pytest

from edgeswarm.placement.cluster import Cluster
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.generators import (
    ClusterParams,
    DagParams,
    on_sampled_clusters,
    random_instance,
    random_layers,
    random_pool,
)
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import evaluate, violation
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId


def draw(seed: int, **dag: float) -> tuple:
    dp = DagParams(**{"tasks": 30, **dag})  # type: ignore[arg-type]
    cp = ClusterParams(devices=8, hw_types=3, sites=2)
    return random_instance(np.random.default_rng(seed), dp, cp, f"i{seed}"), dp, cp


def weakly_connected(g: TaskGraph) -> bool:
    adj: dict[str, set[str]] = {t.id: set() for t in g.tasks}
    for e in g.edges:
        adj[e.src].add(e.dst)
        adj[e.dst].add(e.src)
    seen, todo = {g.tasks[0].id}, [g.tasks[0].id]
    while todo:
        for x in adj[todo.pop()] - seen:
            seen.add(x)
            todo.append(x)
    return len(seen) == len(g.tasks)


def test_same_seed_same_json_other_seed_other_json():
    a, _, _ = draw(7, typed_frac=0.3, splittable_frac=0.2)
    b, _, _ = draw(7, typed_frac=0.3, splittable_frac=0.2)
    c, _, _ = draw(8, typed_frac=0.3, splittable_frac=0.2)
    assert json.dumps(a.to_json()) == json.dumps(b.to_json())
    assert json.dumps(a.to_json()) != json.dumps(c.to_json())


@pytest.mark.parametrize("seed", range(12))
def test_graph_is_a_connected_dag_that_round_trips(seed):
    rng = np.random.default_rng(seed)
    v = int(rng.integers(2, 60))
    inst, _, _ = draw(seed, tasks=v, alpha=float(rng.choice([0.5, 1.0, 2.0])),
                      out_degree=int(rng.integers(1, 6)), typed_frac=0.5)
    g = inst.graph
    assert len(g.tasks) == v
    assert len(g.topological_order()) == v  # acyclic (the constructor also checks)
    assert weakly_connected(g)
    assert any(not g.predecessors(t.id) for t in g.tasks)
    assert len({(e.src, e.dst) for e in g.edges}) == len(g.edges)
    assert TaskGraph.from_json(json.loads(g.dumps())) == g
    assert Cluster.from_json(inst.cluster.dumps()).to_json() == inst.cluster.to_json()
    p = Problem(g, inst.cluster)  # every task has an allowed device present
    assert all(p.allowed[t] for t in range(p.n))


def test_shape_sets_the_number_of_levels():
    rng = np.random.default_rng(0)
    tall = [len(random_layers(rng, 64, 0.5)) for _ in range(20)]
    wide = [len(random_layers(rng, 64, 2.0)) for _ in range(20)]
    assert 10 <= statistics.mean(tall) <= 22  # sqrt(64) / 0.5 = 16
    assert 3 <= statistics.mean(wide) <= 6  # sqrt(64) / 2 = 4
    assert all(sum(map(len, random_layers(rng, 30, a))) == 30 for a in (0.5, 1, 2))


def measured_ccr(p: Problem) -> float:
    pairs = [(a, b) for a in range(p.m) for b in range(p.m) if a != b]
    comm = [statistics.mean(p.lat[a][b] + nbytes * p.inv_bw[a][b] for a, b in pairs)
            for t in range(p.n) for _, nbytes in p.succs[t]]
    comp = statistics.mean(p.mean_comp(t) for t in range(p.n))
    return statistics.mean(comm) / comp


@pytest.mark.parametrize("ccr", [0.1, 1.0, 10.0])
def test_ccr_is_mean_transfer_over_mean_compute(ccr):
    ratios = []
    for seed in range(5):
        inst, _, _ = draw(seed, tasks=60, ccr=ccr, typed_frac=0.2)
        ratios.append(measured_ccr(Problem(inst.graph, inst.cluster)) / ccr)
    assert 0.8 <= statistics.mean(ratios) <= 1.25


def test_beta_spreads_compute_around_flops_over_speed():
    inst, _, _ = draw(3, beta=0.6)
    speed = {d.id: d.flops for d in inst.cluster.devices}
    for t in inst.graph.tasks:
        assert t.compute_s is not None
        for d, sec in t.compute_s.items():
            assert 0.7 - 1e-9 <= sec * speed[d] / t.flops <= 1.3 + 1e-9
    flat, _, _ = draw(3, beta=0.0)
    assert all(t.compute_s is None for t in flat.graph.tasks)


def test_typed_tasks_run_only_on_devices_of_their_types():
    inst, _, _ = draw(5, tasks=50, typed_frac=0.5)
    typed = [t for t in inst.graph.tasks if t.devices is not None]
    assert 10 <= len(typed) <= 40
    ids = set(inst.cluster.ids)
    for t in typed:
        assert set(t.devices or ()) <= ids and 0 < len(t.devices or ()) < len(ids)
    untyped, _, _ = draw(5, typed_frac=0.0)
    assert all(t.devices is None for t in untyped.graph.tasks)


def test_splittable_tasks_are_the_heavy_ones():
    inst, _, _ = draw(2, tasks=40, splittable_frac=0.25, heavy_factor=4.0, beta=0.0)
    split = [t for t in inst.graph.tasks if t.splittable]
    rest = [t for t in inst.graph.tasks if not t.splittable]
    assert len(split) == 10
    assert {t.kind for t in split} <= {"linear", "attention"}
    assert min(t.flops for t in split) > max(t.flops for t in rest)


def test_cluster_ranges_and_link_modes():
    cp = ClusterParams(devices=12, sites=3, all_pairs=False)
    inst = random_instance(np.random.default_rng(1), DagParams(tasks=10), cp)
    c = inst.cluster
    assert c.ids == [f"d{i}" for i in range(12)]
    assert all(5e9 <= d.flops <= 2e11 for d in c.devices)
    assert all(1 << 30 <= d.memory_bytes <= 16 << 30 for d in c.devices)
    assert c.default_link is not None and len(c.links) < 12 * 11 / 2
    full = random_instance(np.random.default_rng(1), DagParams(tasks=10),
                           ClusterParams(devices=12)).cluster
    assert full.default_link is None and len(full.links) == 12 * 11 // 2
    for ln in full.links:
        assert 1e6 <= ln.bandwidth_Bps <= 125e6 and 1e-3 <= ln.latency_s <= 30e-3


@pytest.mark.parametrize("bad", [{"tasks": 0}, {"ccr": 0.0}, {"beta": 3.0},
                                 {"typed_frac": 1.5}, {"out_degree": 0}])
def test_bad_parameters_are_rejected(bad):
    with pytest.raises(InvalidInput):
        DagParams(**bad)


def test_bad_cluster_parameters_are_rejected():
    with pytest.raises(InvalidInput, match="bandwidth_Bps"):
        ClusterParams(bandwidth_Bps=(0.0, 1e6))


def real_graph() -> TaskGraph:
    """A chain shaped like a small model: 6 layers of 300 MB parameters."""
    tasks = tuple(Task(TaskId(f"l{i}"), 2e9, 300 << 20, 4 << 20, kind="linear")
                  for i in range(6))
    edges = tuple(Edge(TaskId(f"l{i}"), TaskId(f"l{i + 1}"), 4 << 20) for i in range(5))
    return TaskGraph(tasks, edges, name="toy")


def test_real_graph_on_sampled_clusters_fits_and_plans():
    g = real_graph()
    out = on_sampled_clusters(g, np.random.default_rng(0), 8, devices=(2, 5))
    assert len(out) == 8 and len({i.name for i in out}) == 8
    for inst in out:
        assert inst.graph is g
        assert 2 <= len(inst.cluster.devices) <= 5
        assert sum(d.memory_bytes for d in inst.cluster.devices) >= 2 * g.total_param_bytes
        p = Problem(inst.graph, inst.cluster)
        groups = heft_groups(p)  # raises if memory makes it infeasible
        assert violation(p, groups) == ""
        assert math.isfinite(evaluate(p, groups).makespan)
    again = on_sampled_clusters(g, np.random.default_rng(0), 8, devices=(2, 5))
    assert [i.cluster.to_json() for i in again] == [i.cluster.to_json() for i in out]


def test_giph_style_hardware_types():
    """type_prob: a device may support several types, each type is on some device, and
    with task_types=1 a task may run exactly on the devices supporting its one type."""
    rng = np.random.default_rng(3)
    cp = ClusterParams(devices=20, hw_types=5, type_prob=0.2)
    inst = random_instance(rng, DagParams(tasks=40, typed_frac=1.0, task_types=1), cp)
    pool = random_pool(np.random.default_rng(3), cp)
    assert all(pool.types[d.id] for d in pool.devices)
    assert set().union(*pool.types.values()) == {f"hw{k}" for k in range(5)}
    assert any(len(ts) > 1 for ts in pool.types.values())
    ids = {d.id for d in inst.cluster.devices}
    for t in inst.graph.tasks:
        assert t.devices is not None and set(t.devices) < ids
    # every allowed set is exactly the devices of one type
    sets = {frozenset(t.devices or ()) for t in inst.graph.tasks}
    assert len(sets) > 1


def test_type_prob_out_of_range_is_refused():
    with pytest.raises(InvalidInput, match="type_prob"):
        ClusterParams(type_prob=1.5)
