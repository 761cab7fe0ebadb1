"""The cost model's semantics, each checked on a hand-computed case."""

import itertools

import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

T = TaskId
D = DeviceId


def chain(splittable: bool = False, param: int = 0) -> TaskGraph:
    """a (1 GFLOP) -> b (4 GFLOP) -> c (1 GFLOP); 1 MB activations."""
    return TaskGraph(
        (Task(T("a"), 1e9, param, 1_000_000), Task(T("b"), 4e9, param, 1_000_000,
                                                    splittable=splittable),
         Task(T("c"), 1e9, param, 1_000_000)),
        (Edge(T("a"), T("b"), 1_000_000), Edge(T("b"), T("c"), 1_000_000)))


def cluster(mem: int = 1 << 30) -> Cluster:
    devs = (Device(D("x"), 1e9, mem), Device(D("y"), 1e9, mem))
    return Cluster(devs, (Link(D("x"), D("y"), 1e6, 0.01),))


def plan(**assign: str | tuple[str, ...]) -> Plan:
    return Plan({T(k): tuple(v) if isinstance(v, tuple) else (D(v),) for k, v in assign.items()})


def test_same_device_costs_no_transfer():
    s = simulate(chain(), cluster(), plan(a="x", b="x", c="x"))
    assert s.makespan == pytest.approx(6.0)
    assert s.feasible


def test_transfer_is_latency_plus_bytes_over_bandwidth():
    s = simulate(chain(), cluster(), plan(a="x", b="y", c="y"))
    # a: 0-1, transfer 0.01 + 1 s, b: 2.01-6.01, c: 6.01-7.01
    assert s.slots[T("b")].start == pytest.approx(2.01)
    assert s.makespan == pytest.approx(7.01)


def test_a_device_runs_one_task_at_a_time_with_insertion():
    g = TaskGraph((Task(T("p"), 2e9, 0, 0), Task(T("q"), 1e9, 0, 0), Task(T("r"), 1e9, 0, 0)),
                  (Edge(T("p"), T("r"), 0),))
    s = simulate(g, cluster(), plan(p="x", q="x", r="x"))
    assert s.makespan == pytest.approx(4.0)
    starts = sorted((sl.start, sl.end) for sl in s.slots.values())
    for (_, e1), (s2, _) in itertools.pairwise(starts):
        assert s2 >= e1 - 1e-12


def test_tensor_parallel_splits_work_and_pays_the_all_reduce():
    g = chain(splittable=True)
    s = simulate(g, cluster(), plan(a="x", b=("x", "y"), c="x"))
    # b: data to y (1.01 s), then 4e9 / 2e9 = 2 s, then the cheaper all-reduce:
    # star 2 * (0.01 + 1) s, ring 2 * (k - 1) * (0.01 + 0.5) s -> the ring, 1.02 s
    b = s.slots[T("b")]
    assert b.devices == ("x", "y")
    assert b.start == pytest.approx(2.01)
    assert b.end - b.start == pytest.approx(2.0 + 1.02)
    # the output is on both members: c on x needs no transfer
    assert s.slots[T("c")].start == pytest.approx(b.end)


def test_codec_trades_compute_for_bytes():
    g = chain()
    plain = simulate(g, cluster(), plan(a="x", b="y", c="y"))
    coded = simulate(g, cluster(), Plan(plan(a="x", b="y", c="y").assignments,
                                         {(T("a"), T("b")): "int8"}))
    # int8: 0.25 MB on the wire (0.25 s) + encode 1 MB*1 FLOP/B / 1e9 + decode 0.5e6 / 1e9
    assert coded.slots[T("b")].start == pytest.approx(1 + 0.01 + 0.25 + 0.001 + 0.0005)
    assert coded.makespan < plain.makespan


def test_memory_over_capacity_is_infeasible_with_the_reason():
    s = simulate(chain(param=400), cluster(mem=1_000_000), plan(a="x", b="x", c="x"))
    assert not s.feasible
    assert "'x'" in s.reason and "bytes" in s.reason


def test_tp_on_a_task_that_cannot_split_is_infeasible():
    s = simulate(chain(), cluster(), plan(a="x", b=("x", "y"), c="x"))
    assert not s.feasible and "not splittable" in s.reason


def test_disallowed_device_is_infeasible():
    g = TaskGraph((Task(T("a"), 1.0, 0, 0, devices=("x",)),), ())
    s = simulate(g, cluster(), plan(a="y"))
    assert not s.feasible and "'a' may not run on device 'y'" in s.reason


def test_bad_plans_are_named():
    with pytest.raises(InvalidInput, match="not assigned"):
        simulate(chain(), cluster(), plan(a="x", b="x"))
    with pytest.raises(InvalidInput, match="unknown device 'z'"):
        simulate(chain(), cluster(), plan(a="x", b="z", c="x"))
    with pytest.raises(InvalidInput, match="unknown codec"):
        simulate(chain(), cluster(), Plan(plan(a="x", b="y", c="x").assignments,
                                          {(T("a"), T("b")): "zip"}))
    with pytest.raises(InvalidInput, match="not an edge"):
        simulate(chain(), cluster(), Plan(plan(a="x", b="y", c="x").assignments,
                                          {(T("a"), T("c")): "int8"}))


def test_plan_json_round_trip_keeps_assignments_codecs_order():
    p = Plan(plan(a="x", b=("x", "y"), c="y").assignments, {(T("a"), T("b")): "fp16"},
             "manual", (T("a"), T("b"), T("c")))
    s = simulate(chain(splittable=True), cluster(), p)
    doc = p.with_schedule(s).to_json()
    assert doc["format"] == "edgeswarm.plan/1"
    assert doc["codecs"] == {"a->b": "fp16"}
    assert doc["predicted_latency_s"] == pytest.approx(s.makespan)
    assert set(doc["schedule"]) == {"a", "b", "c"}
    back = Plan.from_json(doc)
    assert back.assignments == p.assignments and back.codecs == p.codecs
    assert back.order == p.order
    with pytest.raises(InvalidInput, match="src->dst"):
        Plan.from_json({**doc, "codecs": {"ab": "fp16"}})


def test_default_link_cluster():
    c = Cluster((Device(D("x"), 1e9, 1 << 30), Device(D("y"), 1e9, 1 << 30)),
                default_link=LinkSpec(1e6, 0.0))
    s = simulate(chain(), c, plan(a="x", b="y", c="y"))
    assert s.makespan == pytest.approx(7.0)


def test_a_later_task_fills_an_earlier_idle_gap():
    """Insertion: q, scheduled after r, still runs in x's idle time before r."""
    g = TaskGraph((Task(T("p"), 3e9, 0, 0), Task(T("r"), 1e9, 0, 0), Task(T("q"), 1e9, 0, 0)),
                  (Edge(T("p"), T("r"), 0),))
    p = Plan(plan(p="y", r="x", q="x").assignments, order=(T("p"), T("r"), T("q")))
    s = simulate(g, cluster(), p)
    assert s.slots[T("r")].start == pytest.approx(3.01)
    assert s.slots[T("q")].start == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(6))
def test_evaluate_from_a_prefix_is_evaluate(make_instance, seed):
    """Re-scheduling only from the first changed task gives the whole replay's timeline,
    for relocations, tensor-parallel groups and codecs."""
    import numpy as np

    from edgeswarm.placement.heft import heft_groups
    from edgeswarm.placement.problem import Problem
    from edgeswarm.placement.simulator import evaluate, evaluate_from

    rng = np.random.default_rng(seed)
    graph, cluster = make_instance(seed, tasks=25, devices=5, splittable=0.3)
    p = Problem(graph, cluster)
    order = list(p.default_order)
    groups = heft_groups(p)
    codecs: dict = {}
    base = evaluate(p, groups, codecs, order)
    for _ in range(30):
        k = int(rng.integers(p.n))
        t = order[k]
        new_groups = list(groups)
        allowed = list(p.allowed[t])
        if p.splittable[t] and len(allowed) > 1 and rng.uniform() < 0.5:
            new_groups[t] = tuple(int(x) for x in rng.choice(allowed, size=2, replace=False))
        else:
            new_groups[t] = (int(rng.choice(allowed)),)
        new_codecs = dict(codecs)
        for s, _ in p.preds[t]:
            if rng.uniform() < 0.5:
                new_codecs[(s, t)] = p.codec_table["int8"]
        calls = p.calls
        fast = evaluate_from(p, new_groups, new_codecs, order, base, k)
        assert p.calls == calls + 1
        assert fast == evaluate(p, new_groups, new_codecs, order)
        groups, codecs, base = new_groups, new_codecs, fast


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_codecs", [False, True])
def test_first_finish_is_the_least_finish_over_devices(make_instance, seed, with_codecs):
    """The all-devices shortcuts of list scheduling (arrivals at once, no slot search
    where arrival + compute is already no better) choose exactly what probing every
    device with ``finish`` does, look-ahead included, next to tensor-parallel sources."""
    import numpy as np

    from edgeswarm.placement.problem import Problem
    from edgeswarm.placement.simulator import ListScheduler

    rng = np.random.default_rng(seed)
    graph, cluster = make_instance(seed, tasks=25, devices=5, splittable=0.3)
    p = Problem(graph, cluster)
    codecs = {(s, d): p.codec_table["int8"] for s in range(p.n) for d, _ in p.succs[s]
              if with_codecs and rng.uniform() < 0.5}
    ls = ListScheduler(p, codecs)
    for t in p.default_order:
        assert ls.arrivals(t) == [ls.ready(t, (j,)) for j in range(p.m)]
        extra = rng.uniform(0, 2, p.m).tolist()
        devices = [j for j in p.allowed[t] if rng.uniform() < 0.8]
        probed = [(ls.finish(t, (j,)) + extra[j], j) for j in devices]
        want = min(probed, key=lambda fj: fj[0]) if probed else (float("inf"), -1)
        assert ls.first_finish(t, devices, extra) == want
        assert ls.first_finish(t, devices) == min(
            ((ls.finish(t, (j,)), j) for j in devices), key=lambda fj: fj[0],
            default=(float("inf"), -1))
        allowed = list(p.allowed[t])
        if p.splittable[t] and len(allowed) > 1 and rng.uniform() < 0.5:
            ls.place(t, tuple(int(x) for x in rng.choice(allowed, size=2, replace=False)))
        else:
            ls.place(t, (want[1] if want[1] >= 0 else allowed[0],))
