"""The search policy: budget, never worse than its start, TP groups and codecs."""

import numpy as np
import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.moves import State
from edgeswarm.placement.policies import Options, Solution, place, policy, solve
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.search import anneal, critical_tasks, specs
from edgeswarm.placement.simulator import evaluate, simulate
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

search = policy("search")


def makespan(p: Problem, sol: Solution) -> float:
    calls = p.calls
    ms = evaluate(p, sol.groups, specs(p, sol.codecs), sol.order).makespan
    p.calls = calls
    return ms


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("budget", [0, 1, 2, 7, 48])
def test_spends_at_most_its_budget_and_never_gets_worse(seed, budget, make_instance):
    p = Problem(*make_instance(seed))
    start = makespan(p, Solution(heft_groups(p)))
    before = p.calls
    sol = search(p, Options(budget=budget, seed=seed))
    assert p.calls - before <= budget
    assert makespan(p, sol) <= start


def test_default_budget_is_two_per_task(make_instance):
    graph, cluster = make_instance(4)
    plan = place(graph, cluster, "search")
    assert 0 < plan.simulator_calls <= 2 * len(graph.tasks)


def test_improves_on_heft_with_a_budget(make_instance):
    ratios = []
    for seed in range(4):
        graph, cluster = make_instance(seed, tasks=30)
        h = place(graph, cluster, "heft")
        s = place(graph, cluster, "search", Options(budget=600, seed=seed))
        assert h.schedule is not None and s.schedule is not None
        ratios.append(s.schedule.makespan / h.schedule.makespan)
    assert max(ratios) <= 1.0
    assert sum(ratios) / len(ratios) < 0.97


def test_deterministic_for_a_seed(make_instance):
    graph, cluster = make_instance(5)
    a = place(graph, cluster, "search", Options(budget=80, seed=3))
    b = place(graph, cluster, "search", Options(budget=80, seed=3))
    assert a.assignments == b.assignments and a.codecs == b.codecs
    assert a.simulator_calls == b.simulator_calls


def test_from_a_given_start_keeps_its_order_and_never_gets_worse(peft_paper):
    p = Problem(*peft_paper)
    start = policy("peft")(p, Options())
    assert start.order is not None
    sol = search(p, Options(budget=40, start=start))
    assert sol.order == start.order
    assert makespan(p, sol) <= makespan(p, start) == 122.0


def test_budget_zero_returns_the_start_untouched(peft_paper):
    p = Problem(*peft_paper)
    start = policy("peft")(p, Options())
    sol = search(p, Options(budget=0, start=start))
    assert (sol.groups, sol.codecs, sol.order) == (start.groups, start.codecs, start.order)
    assert p.calls == 0


def test_an_infeasible_start_falls_back_to_heft():
    tasks = (Task(TaskId("a"), 1.0, 600, 0), Task(TaskId("b"), 1.0, 600, 0))
    cluster = Cluster((Device(DeviceId("x"), 1.0, 1000), Device(DeviceId("y"), 1.0, 1000)),
                      default_link=LinkSpec(1.0, 0.0))
    p = Problem(TaskGraph(tasks, ()), cluster)
    crowded = Solution([(0,), (0,)])  # 1200 bytes on a 1000-byte device
    plan = solve(p, "search", Options(budget=5, start=crowded))
    assert plan.schedule is not None and plan.schedule.feasible


def test_rejects_a_negative_budget_and_a_start_of_the_wrong_size(peft_paper):
    p = Problem(*peft_paper)
    with pytest.raises(InvalidInput, match="budget"):
        search(p, Options(budget=-1))
    with pytest.raises(InvalidInput, match="10"):
        search(p, Options(start=Solution([(0,)])))


def tp_instance() -> tuple[TaskGraph, Cluster]:
    """A heavy splittable task between two light ones, on four equal devices with fast
    links: splitting it four ways cuts its time by four."""
    tasks = (Task(TaskId("a"), 1e8, 1000, 1000),
             Task(TaskId("big"), 8e9, 1000, 1000, splittable=True),
             Task(TaskId("c"), 1e8, 1000, 1000))
    edges = (Edge(TaskId("a"), TaskId("big"), 1000), Edge(TaskId("big"), TaskId("c"), 1000))
    devices = tuple(Device(DeviceId(f"d{k}"), 1e9, 1 << 30) for k in range(4))
    return TaskGraph(tasks, edges), Cluster(devices, default_link=LinkSpec(1e9, 1e-5))


def test_forms_a_tensor_parallel_group_and_beats_heft():
    graph, cluster = tp_instance()
    h = place(graph, cluster, "heft")
    s = place(graph, cluster, "search", Options(budget=20))
    assert h.schedule is not None and s.schedule is not None
    assert len(s.assignments["big"]) > 1
    assert s.schedule.makespan < 0.5 * h.schedule.makespan
    assert simulate(graph, cluster, s).makespan == s.schedule.makespan


def test_no_groups_without_tp():
    graph, cluster = tp_instance()
    s = place(graph, cluster, "search", Options(budget=20, tp=False))
    assert all(len(devs) == 1 for devs in s.assignments.values())


def codec_instance() -> tuple[TaskGraph, Cluster]:
    """Two tasks pinned to two devices joined by a slow link: the 10 MB activation
    dominates unless a codec shrinks it."""
    tasks = (Task(TaskId("a"), 1e9, 0, 10_000_000, devices=("x",)),
             Task(TaskId("b"), 1e9, 0, 0, devices=("y",)))
    graph = TaskGraph(tasks, (Edge(TaskId("a"), TaskId("b"), 10_000_000),))
    devices = (Device(DeviceId("x"), 1e10, 1 << 30), Device(DeviceId("y"), 1e10, 1 << 30))
    return graph, Cluster(devices, (Link(DeviceId("x"), DeviceId("y"), 1e6, 1e-3),))


def test_puts_a_codec_on_a_slow_cut_edge():
    graph, cluster = codec_instance()
    h = place(graph, cluster, "heft")
    s = place(graph, cluster, "search", Options(budget=10))
    assert h.schedule is not None and s.schedule is not None
    assert s.codecs.get((TaskId("a"), TaskId("b")), "none") != "none"
    assert s.schedule.makespan < 0.5 * h.schedule.makespan
    assert simulate(graph, cluster, s).makespan == s.schedule.makespan
    plain = place(graph, cluster, "search", Options(budget=10, codecs=False))
    assert not plain.codecs


def test_critical_tasks_of_a_chain_and_a_side_branch():
    # a -> b -> c on one device; d hangs off a and ends early
    tasks = tuple(Task(TaskId(n), f, 0, 0) for n, f in
                  [("a", 1.0), ("b", 5.0), ("c", 1.0), ("d", 1.0)])
    edges = (Edge(TaskId("a"), TaskId("b"), 0), Edge(TaskId("b"), TaskId("c"), 0),
             Edge(TaskId("a"), TaskId("d"), 0))
    cluster = Cluster((Device(DeviceId("x"), 1.0, 1 << 20), Device(DeviceId("y"), 1.0, 1 << 20)),
                      default_link=LinkSpec(1.0, 0.0))
    p = Problem(TaskGraph(tasks, edges), cluster)
    groups = [(0,), (0,), (0,), (1,)]
    tl = evaluate(p, groups)
    assert tl.makespan == 7.0
    assert critical_tasks(p, groups, {}, tl) == [0, 1, 2]


def test_anneal_from_heft_is_reproducible_with_a_generator(make_instance):
    p = Problem(*make_instance(8))
    start = State(heft_groups(p))
    a = anneal(p, start, 30, np.random.default_rng(1))
    b = anneal(p, start, 30, np.random.default_rng(1))
    assert a.groups == b.groups and a.codecs == b.codecs
