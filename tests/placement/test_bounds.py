"""Lower bound and exact optimum: the bound is below every plan the simulator can run."""

import itertools

import numpy as np
import pytest

from edgeswarm.placement import suites
from edgeswarm.placement.bounds import lower_bound, optimum, path_bound, space_size
from edgeswarm.placement.cluster import Cluster, Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.generators import ClusterParams, DagParams, random_instance
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.problem import Group, Problem
from edgeswarm.placement.simulator import evaluate, violation
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

T, D = TaskId, DeviceId
TOL = 1 + 1e-9


def brute_force(p: Problem) -> float:
    best = float("inf")
    for combo in itertools.product(*p.allowed):
        groups = [(j,) for j in combo]
        if not violation(p, groups):
            best = min(best, evaluate(p, groups).makespan)
    return best


def tiny_problems(n: int) -> list[Problem]:
    return [Problem(x.graph, x.cluster) for x in suites.build("tiny", n)]


def test_bound_optimum_heft_are_ordered_and_optimum_is_exact():
    for p in tiny_problems(60):
        lb = lower_bound(p)
        best, groups = optimum(p)
        assert violation(p, groups) == ""
        assert evaluate(p, groups).makespan == pytest.approx(best, rel=1e-12)
        assert best == pytest.approx(brute_force(p), rel=1e-12)
        assert lb <= best * TOL
        assert lower_bound(p, codecs=False) <= best * TOL
        assert best <= evaluate(p, heft_groups(p)).makespan * TOL


def random_order(p: Problem, rng: np.random.Generator) -> list[int]:
    indegree = [len(p.preds[t]) for t in range(p.n)]
    ready = [t for t in range(p.n) if indegree[t] == 0]
    order = []
    while ready:
        t = ready.pop(int(rng.integers(len(ready))))
        order.append(t)
        for s, _ in p.succs[t]:
            indegree[s] -= 1
            if indegree[s] == 0:
                ready.append(s)
    return order


def random_plan(p: Problem, rng: np.random.Generator, tp: bool) -> list[Group]:
    groups: list[Group] = []
    for t in range(p.n):
        ok = p.allowed[t]
        k = int(rng.integers(1, len(ok) + 1)) if tp and p.splittable[t] else 1
        groups.append(tuple(int(j) for j in rng.choice(ok, size=k, replace=False)))
    return groups


@pytest.mark.parametrize("seed", range(40))
def test_bound_holds_for_random_plans_with_groups_codecs_and_orders(seed):
    rng = np.random.default_rng(seed)
    dp = DagParams(tasks=int(rng.integers(2, 9)), ccr=float(rng.choice([0.1, 1.0, 10.0])),
                   beta=float(rng.uniform(0, 1)), typed_frac=0.3, splittable_frac=0.4,
                   heavy_factor=3.0, alpha=float(rng.choice([0.5, 1.0, 2.0])))
    cp = ClusterParams(devices=int(rng.integers(2, 5)), hw_types=2, sites=2)
    p = Problem(*_graph_cluster(random_instance(rng, dp, cp)))
    lb_tp = lower_bound(p, tp=True)
    lb_plain = lower_bound(p, codecs=False)
    names = list(p.codec_table)
    edges = [(s, t) for s in range(p.n) for t, _ in p.succs[s]]
    assert lb_tp <= lower_bound(p) * TOL
    for _ in range(30):
        groups = random_plan(p, rng, tp=True)
        codecs = {e: p.codec_table[str(rng.choice(names))] for e in edges}
        order = random_order(p, rng)
        assert lb_tp <= evaluate(p, groups, codecs, order).makespan * TOL
        single = random_plan(p, rng, tp=False)
        assert lb_plain <= evaluate(p, single, None, order).makespan * TOL
        assert lower_bound(p) <= evaluate(p, single, codecs, order).makespan * TOL


def _graph_cluster(inst):
    return inst.graph, inst.cluster


def two_devices(speed2: float = 1.0, bw: float = 1.0, lat: float = 0.0) -> Cluster:
    return Cluster((Device(D("a"), 1.0, 1 << 30), Device(D("b"), speed2, 1 << 30)),
                   (Link(D("a"), D("b"), bw, lat),))


def test_independent_tasks_load_is_tight():
    g = TaskGraph(tuple(Task(T(f"t{i}"), 1.0, 0, 0) for i in range(4)), ())
    p = Problem(g, two_devices())
    assert lower_bound(p) == pytest.approx(2.0)
    assert optimum(p)[0] == pytest.approx(2.0)


def test_restricted_tasks_must_share_their_devices():
    tasks = (Task(T("x"), 3.0, 0, 0, devices=("a",)), Task(T("y"), 3.0, 0, 0, devices=("a",)),
             Task(T("z"), 1.0, 0, 0))
    p = Problem(TaskGraph(tasks, ()), two_devices(speed2=100.0))
    assert lower_bound(p) == pytest.approx(6.0)


def test_join_pays_transfer_or_shares_a_device():
    """a and b (1 s each, 10 bytes out) feed c (1 s); every transfer takes 10 s. Whatever
    the plan, c waits 10 s for a transfer or a and b share a device: makespan ≥ 3."""
    tasks = tuple(Task(T(n), 1.0, 0, 10) for n in "abc")
    edges = (Edge(T("a"), T("c"), 10), Edge(T("b"), T("c"), 10))
    p = Problem(TaskGraph(tasks, edges), two_devices(bw=1.0))
    assert path_bound(p, codecs=False) == pytest.approx(3.0)
    assert optimum(p)[0] == pytest.approx(3.0)


def test_transfer_counts_when_tasks_cannot_share():
    tasks = (Task(T("a"), 1.0, 0, 4, devices=("a",)), Task(T("b"), 1.0, 0, 0, devices=("b",)))
    g = TaskGraph(tasks, (Edge(T("a"), T("b"), 4),))
    c = Cluster((Device(D("a"), 1.0, 1 << 30), Device(D("b"), 1.0, 1 << 30)),
                default_link=LinkSpec(2.0, 0.5))
    p = Problem(g, c)
    assert lower_bound(p, codecs=False) == pytest.approx(1 + 0.5 + 2 + 1)
    assert lower_bound(p) <= lower_bound(p, codecs=False)
    assert optimum(p)[0] == pytest.approx(4.5)


def test_tensor_parallel_bound_splits_the_work():
    g = TaskGraph((Task(T("big"), 8.0, 0, 0, splittable=True),), ())
    p = Problem(g, two_devices(speed2=3.0))
    assert lower_bound(p) == pytest.approx(8.0 / 3.0)
    assert lower_bound(p, tp=True) == pytest.approx(2.0)
    assert evaluate(p, [(0, 1)]).makespan >= 2.0


def test_optimum_refuses_a_large_space():
    g = TaskGraph(tuple(Task(T(f"t{i}"), 1.0, 0, 0) for i in range(12)), ())
    p = Problem(g, two_devices())
    assert space_size(p) == 4096
    with pytest.raises(InvalidInput, match="4096 assignments exceed the limit 1000"):
        optimum(p, limit=1000)


def test_optimum_respects_memory():
    tasks = (Task(T("x"), 1.0, 600, 0), Task(T("y"), 1.0, 600, 0))
    tight = Cluster((Device(D("a"), 1.0, 1000), Device(D("b"), 0.1, 1000)),
                    default_link=LinkSpec(1.0, 0.0))
    best, groups = optimum(Problem(TaskGraph(tasks, ()), tight))
    assert sorted(groups) == [(0,), (1,)]  # both fit only apart
    assert best == pytest.approx(10.0)
    none = Cluster((Device(D("a"), 1.0, 100),), ())
    with pytest.raises(PlacementInfeasible, match="fits in the memory"):
        optimum(Problem(TaskGraph(tasks, ()), none))


def test_tensor_parallel_output_is_on_every_member():
    """big runs on both devices; each successor reads the output where it already is,
    so no transfer is due even though the link is slow: makespan 4 + 5 = 9."""
    tasks = (Task(T("big"), 8.0, 0, 0, splittable=True), Task(T("s1"), 5.0, 0, 0),
             Task(T("s2"), 5.0, 0, 0))
    edges = (Edge(T("big"), T("s1"), 10), Edge(T("big"), T("s2"), 10))
    p = Problem(TaskGraph(tasks, edges), two_devices(bw=1.0))
    plan = [(0, 1), (0,), (1,)]
    assert evaluate(p, plan).makespan == pytest.approx(9.0)
    assert lower_bound(p, tp=True) == pytest.approx(9.0)
