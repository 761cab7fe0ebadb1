"""Random and greedy baselines, and what every registered policy must guarantee."""

import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import PlacementInfeasible
from edgeswarm.placement.policies import Options, place
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

POLICIES = ["random", "greedy", "peft", "search"]


def critical_path_bound(graph: TaskGraph, cluster: Cluster) -> float:
    """Longest path with every task at its fastest device and free transfers."""
    p = Problem(graph, cluster)
    longest = [0.0] * p.n
    for t in p.topo:
        ready = max((longest[s] for s, _ in p.preds[t]), default=0.0)
        longest[t] = ready + min(p.comp[t])
    return max(longest)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("seed", [1, 2])
def test_plan_is_feasible_and_its_makespan_is_the_simulators(policy, seed, make_instance):
    graph, cluster = make_instance(seed)
    plan = place(graph, cluster, policy, Options(seed=seed))
    assert plan.schedule is not None and plan.schedule.feasible
    again = simulate(graph, cluster, plan)
    assert again.feasible
    assert again.makespan == plan.schedule.makespan
    assert again.slots == plan.schedule.slots
    for task in graph.tasks:
        if task.devices is not None:
            assert set(plan.assignments[task.id]) <= set(task.devices)


@pytest.mark.parametrize("policy", POLICIES)
def test_sane_on_the_heft_paper_example(policy, heft_paper):
    graph, cluster = heft_paper
    plan = place(graph, cluster, policy)
    assert plan.schedule is not None
    assert plan.schedule.makespan >= critical_path_bound(graph, cluster)
    # nothing is worse than running everything on the slowest device in sequence
    assert plan.schedule.makespan <= sum(max(t.compute_s.values()) for t in graph.tasks
                                         if t.compute_s)


def test_random_is_deterministic_for_a_seed(make_instance):
    graph, cluster = make_instance(3)
    a = place(graph, cluster, "random", Options(seed=7))
    b = place(graph, cluster, "random", Options(seed=7))
    assert a.assignments == b.assignments
    others = {tuple(sorted(place(graph, cluster, "random", Options(seed=s)).assignments.items()))
              for s in range(5)}
    assert len(others) > 1


def test_random_uses_no_groups_or_codecs(make_instance):
    graph, cluster = make_instance(4, splittable=0.5)
    plan = place(graph, cluster, "random")
    assert all(len(devs) == 1 for devs in plan.assignments.values())
    assert not plan.codecs


def test_random_fills_memory_without_overflowing_it():
    # 6 tasks of 40 bytes on two devices of 130 bytes: three fit on each, no more
    tasks = tuple(Task(TaskId(f"t{i}"), 1.0, 40, 0) for i in range(6))
    cluster = Cluster((Device(DeviceId("a"), 1.0, 130), Device(DeviceId("b"), 1.0, 130)),
                      default_link=LinkSpec(1.0, 0.0))
    for seed in range(5):
        plan = place(TaskGraph(tasks, ()), cluster, "random", Options(seed=seed))
        assert plan.schedule is not None and plan.schedule.feasible
        assert sorted(plan.schedule.memory_bytes.values()) == [120, 120]


def test_greedy_takes_tasks_in_topological_order(heft_paper):
    graph, cluster = heft_paper
    plan = place(graph, cluster, "greedy")
    assert plan.order == tuple(graph.topological_order())


@pytest.mark.parametrize("policy", [*POLICIES, "heft"])
def test_a_task_that_fits_nowhere_is_named(policy):
    tasks = (Task(TaskId("small"), 1.0, 10, 0), Task(TaskId("huge"), 1.0, 10_000, 0))
    graph = TaskGraph(tasks, (Edge(TaskId("small"), TaskId("huge"), 1),))
    cluster = Cluster((Device(DeviceId("a"), 1.0, 1000), Device(DeviceId("b"), 2.0, 1000)),
                      default_link=LinkSpec(1.0, 0.0))
    with pytest.raises(PlacementInfeasible, match="'huge'"):
        place(graph, cluster, policy)
