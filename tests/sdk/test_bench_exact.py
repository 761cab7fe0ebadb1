"""The CP-SAT bound: never above a real plan, tighter than the fast bound where the fast
bound relaxes device choice, exact on a case worked by hand."""

import sys

import pytest

from edgeswarm.bench.exact import ExactBound, exact_bound
from edgeswarm.placement import policies, suites
from edgeswarm.placement.bounds import lower_bound, optimum
from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.errors import InvalidInput, RuntimeNotAvailable
from edgeswarm.placement.policies import Options
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId


def fan_out() -> Problem:
    """a feeds b (only on x) and c (only on y); a transfer costs 1 s, a task 0.1 s:
    wherever a runs, one of b, c waits for a transfer, so the optimum is 1.2 s."""
    t = [Task(TaskId("a"), 1e8, 0, 1000, devices=("x", "y")),
         Task(TaskId("b"), 1e8, 0, 0, devices=("x",)),
         Task(TaskId("c"), 1e8, 0, 0, devices=("y",))]
    g = TaskGraph(tuple(t), (Edge(TaskId("a"), TaskId("b"), 1000),
                             Edge(TaskId("a"), TaskId("c"), 1000)))
    c = Cluster((Device(DeviceId("x"), 1e9, 1 << 30), Device(DeviceId("y"), 1e9, 1 << 30)),
                default_link=LinkSpec(1e6, 0.999))
    return Problem(g, c)


def bounds(suite: str, i: int) -> tuple[Problem, float, ExactBound]:
    """Instance ``i`` of ``suite``, its fast bound and CP-SAT's."""
    inst = suites.build(suite, i + 1)[i]
    p = Problem(inst.graph, inst.cluster)
    fast = lower_bound(p, codecs=False)
    return p, fast, exact_bound(p, fast, seconds=0.5)


def test_hand_worked_optimum():
    p = fan_out()
    e = exact_bound(p, 0.1, seconds=1.0)
    assert e.optimal and e.bound == pytest.approx(1.2, rel=1e-4)
    assert e.bound <= optimum(p)[0] + 1e-12


def test_tighter_than_the_fast_bound_where_it_relaxes_device_choice():
    """giph_grid instance 6 (20 tasks): the fast bound is 7% below the optimum CP-SAT
    proves; every plan a policy finds lies above the proven bound."""
    p, fast, e = bounds("giph_grid", 6)
    assert e.optimal and e.bound > 1.05 * fast
    plan = policies.solve(p, "search", Options(codecs=False, budget=20 * p.n))
    assert plan.predicted_latency_s >= e.bound * (1 - 1e-9)


@pytest.mark.parametrize("i", range(4))
def test_no_policy_beats_the_bound_on_giph_grid(i):
    p, fast, e = bounds("giph_grid", i)
    assert e.bound >= fast
    for pol in ("heft", "search", "greedy"):
        plan = policies.solve(p, pol, Options(codecs=False, seed=i))
        assert plan.predicted_latency_s >= e.bound * (1 - 1e-9), pol


@pytest.mark.parametrize("seed", range(6))
def test_below_the_brute_force_optimum_on_tiny(seed):
    p, fast, e = bounds("tiny", seed)
    opt = optimum(p)[0]
    assert fast <= e.bound <= opt * (1 + 1e-9)


def test_missing_ortools_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ortools.sat.python", None)
    with pytest.raises(RuntimeNotAvailable, match="pip install ortools"):
        exact_bound(fan_out(), 0.2)


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidInput, match="floor > 0"):
        exact_bound(fan_out(), 0.0)
