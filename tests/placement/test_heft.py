"""HEFT against the worked example of Topcuoglu, Hariri and Wu (2002), Fig. 2."""

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.heft import heft
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

COSTS = {  # task: (P1, P2, P3)
    1: (14, 16, 9), 2: (13, 19, 18), 3: (11, 13, 19), 4: (13, 8, 17), 5: (12, 13, 10),
    6: (13, 16, 9), 7: (7, 15, 11), 8: (5, 11, 14), 9: (18, 12, 20), 10: (21, 7, 16),
}
EDGES = [(1, 2, 18), (1, 3, 12), (1, 4, 9), (1, 5, 11), (1, 6, 14), (2, 8, 19), (2, 9, 16),
         (3, 7, 23), (4, 8, 27), (4, 9, 23), (5, 9, 13), (6, 8, 15), (7, 10, 17),
         (8, 10, 11), (9, 10, 13)]


def paper_instance() -> tuple[TaskGraph, Cluster]:
    tasks = tuple(Task(TaskId(f"n{i}"), 1.0, 0, 0,
                       compute_s={f"p{k + 1}": float(c) for k, c in enumerate(cs)})
                  for i, cs in COSTS.items())
    edges = tuple(Edge(TaskId(f"n{s}"), TaskId(f"n{d}"), b) for s, d, b in EDGES)
    devices = tuple(Device(DeviceId(f"p{k}"), 1.0, 1 << 30) for k in (1, 2, 3))
    return TaskGraph(tasks, edges), Cluster(devices, default_link=LinkSpec(1.0, 0.0))


def test_heft_makespan_is_80_on_the_paper_example():
    graph, cluster = paper_instance()
    plan = heft(graph, cluster)
    assert plan.schedule is not None
    assert plan.schedule.makespan == 80.0
    # the paper's schedule: n1 on P3 first, n10 last on P2
    assert plan.assignments[TaskId("n1")] == ("p3",)
    assert plan.assignments[TaskId("n10")] == ("p2",)
    assert plan.order is not None and plan.order[:4] == ("n1", "n3", "n4", "n2")


def test_simulator_reproduces_heft_schedule():
    graph, cluster = paper_instance()
    plan = heft(graph, cluster)
    again = simulate(graph, cluster, plan)
    assert again.makespan == 80.0
    assert plan.schedule is not None
    assert again.slots == plan.schedule.slots
