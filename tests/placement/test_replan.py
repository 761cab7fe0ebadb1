"""Re-planning after devices leave or join: what stays, what moves, what cannot be done."""

import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import PlacementInfeasible
from edgeswarm.placement.heft import heft
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.policies import Options, place
from edgeswarm.placement.replan import replan, tasks_moved
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.suites import build_dynamic
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

T = TaskId
D = DeviceId
MB = 1_000_000


def two_chains(pinned: bool = False) -> TaskGraph:
    """a1 -> a2 and b1 -> b2, 1 GFLOP each, 10 MB between the links of a chain."""
    only_b = ("b",) if pinned else None
    tasks = (Task(T("a1"), 1e9, MB, MB), Task(T("a2"), 1e9, MB, MB),
             Task(T("b1"), 1e9, MB, MB, devices=only_b), Task(T("b2"), 1e9, MB, MB))
    return TaskGraph(tasks, (Edge(T("a1"), T("a2"), 10 * MB), Edge(T("b1"), T("b2"), 10 * MB)))


def cluster(*ids: str, memory: int = 1 << 30, flops: float = 1e9) -> Cluster:
    return Cluster(tuple(Device(D(i), flops, memory) for i in ids),
                   default_link=LinkSpec(1e6, 0.01))


def test_nothing_changed_nothing_moves():
    g, c = two_chains(), cluster("a", "b", "c")
    old = heft(g, c)
    r = replan(old, g, c, "repair")
    assert r.tasks_moved == 0 and r.kept == 4
    assert r.plan.assignments == old.assignments
    assert r.plan.predicted_latency_s == pytest.approx(old.predicted_latency_s)


def test_a_device_leaves_its_tasks_move_the_others_stay():
    g = two_chains()
    old = heft(g, cluster("a", "b", "c"))
    chains = {old.assignments[T("a1")], old.assignments[T("b1")]}
    assert len(chains) == 2  # HEFT runs the two chains in parallel
    (gone,) = old.assignments[T("b1")]
    (stays,) = old.assignments[T("a1")]
    new_cluster = cluster(*(d for d in ("a", "b", "c") if d != gone))
    for policy in ("repair", "search"):
        r = replan(old, g, new_cluster, policy)
        new = r.plan
        assert new.schedule is not None and new.schedule.feasible
        assert new.assignments[T("a1")] == new.assignments[T("a2")] == (stays,)
        assert gone not in new.used_devices()
        assert r.tasks_moved == 2 and r.kept == 2
        assert r.tasks_moved == tasks_moved(old, new)
        # the plan it returns is what the simulator says about it
        again = simulate(g, new_cluster, new)
        assert again.makespan == pytest.approx(new.predicted_latency_s)


def test_a_much_faster_device_joins_and_work_moves_to_it():
    g = two_chains()
    before = cluster("a", "b")
    old = heft(g, before)
    fast = Device(D("fast"), 1e11, 1 << 30)
    after = before.with_devices([fast])
    for known in (None, before):  # told the old cluster, or reading it off the plan
        r = replan(old, g, after, "repair", old_cluster=known)
        assert "fast" in r.plan.used_devices()
        assert r.plan.predicted_latency_s < old.predicted_latency_s / 2
        assert r.tasks_moved + r.kept == 4


def test_tensor_parallel_group_is_dropped_without_tp():
    g = TaskGraph((Task(T("x"), 4e9, MB, MB, splittable=True),), ())
    c = cluster("a", "b")
    old = Plan({T("x"): (D("a"), D("b"))})
    assert replan(old, g, c, "repair").tasks_moved == 0
    r = replan(old, g, c, "repair", Options(tp=False))
    assert len(r.plan.assignments[T("x")]) == 1 and r.tasks_moved == 1


def test_fewer_moves_than_planning_from_scratch():
    inst = build_dynamic(1, seed=7)[0]
    opts = Options(tp=False, codecs=False)
    plan = place(inst.graph, inst.cluster, "search", opts)
    moved = scratch_moved = 0
    for c in inst.events[:8]:
        r = replan(plan, inst.graph, c, "search", opts)
        scratch = place(inst.graph, c, "search", opts)
        assert r.plan.schedule is not None and r.plan.schedule.feasible
        assert set(r.plan.used_devices()) <= set(c.ids)
        moved += r.tasks_moved
        scratch_moved += tasks_moved(plan, scratch)
        plan = r.plan
    assert moved < scratch_moved


def test_removing_every_device_a_task_may_run_on_names_it():
    g = two_chains(pinned=True)
    old = heft(g, cluster("a", "b", "c"))
    with pytest.raises(PlacementInfeasible, match="'b1'"):
        replan(old, g, cluster("a", "c"), "repair")


def test_a_task_too_big_for_every_memory_left_is_named():
    g = two_chains()
    old = heft(g, cluster("a", "b", "c"))
    small = Cluster((Device(D("a"), 1e9, 3 * MB), Device(D("tiny"), 1e9, MB)),
                    default_link=LinkSpec(1e6, 0.01))
    with pytest.raises(PlacementInfeasible, match="fits in the memory of none"):
        replan(old, g, small, "search")
