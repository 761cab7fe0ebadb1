"""Codecs valid on some edges only (a learned codec is trained for one cut): the planners
offer them there and nowhere else, and plans that put them elsewhere are refused."""

import itertools

import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.codecs import NONE, CodecSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.moves import SetCodec, State, moves
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.policies import Options, solve
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

MB = 1 << 20
#: a -> b -> c -> d, pinned so that every edge is cut: cam, srv, cam, srv.
PINS = {"a": "cam", "b": "srv", "c": "cam", "d": "srv"}
LEARNED = CodecSpec("learned", 0.001, 0.0, 0.0, edges=frozenset({("b", "c")}))
INT8 = CodecSpec("int8", 0.25, 1.0, 1.0)


def instance() -> tuple[TaskGraph, Cluster]:
    tasks = tuple(Task(TaskId(t), 1e6, 0, MB, devices=(d,)) for t, d in PINS.items())
    names = list(PINS)
    edges = tuple(Edge(TaskId(s), TaskId(d), MB) for s, d in itertools.pairwise(names))
    devices = tuple(Device(DeviceId(d), 1e9, 1 << 30) for d in ("cam", "srv"))
    cluster = Cluster(devices, default_link=LinkSpec(1.25e6, 0.02))   # 10 Mbit/s, 20 ms
    return TaskGraph(tasks, edges), cluster


def table(learned: CodecSpec = LEARNED) -> dict[str, CodecSpec]:
    return {"none": NONE, "int8": INT8, learned.name: learned}


def test_a_spec_knows_its_edges_and_refuses_malformed_ones():
    assert LEARNED.allows("b", "c") and not LEARNED.allows("a", "b")
    assert INT8.allows("a", "b") and INT8.edges is None
    assert INT8.only_on([["a", "b"]]).edges == frozenset({("a", "b")})
    with pytest.raises(InvalidInput, match="at least one edge"):
        CodecSpec("x", 0.5, 0, 0, edges=frozenset())
    with pytest.raises(InvalidInput, match=r"\(src task, dst task\) pairs"):
        CodecSpec("x", 0.5, 0, 0, edges=frozenset({("a", "b", "c")}))  # type: ignore[arg-type]


def test_moves_offer_a_restricted_codec_on_its_edge_only():
    graph, cluster = instance()
    p = Problem(graph, cluster, table())
    start = State([(p.d_index[DeviceId(PINS[t])],) for t in p.task_ids])
    offered = {(p.task_ids[m.src], p.task_ids[m.dst], m.codec)
               for m in moves(p, start, tp=False) if isinstance(m, SetCodec)}
    assert offered == {("a", "b", "int8"), ("b", "c", "int8"), ("c", "d", "int8"),
                       ("b", "c", "learned")}
    assert p.codec_allowed("learned", p.t_index[TaskId("b")], p.t_index[TaskId("c")])
    assert not p.codec_allowed("learned", p.t_index[TaskId("a")], p.t_index[TaskId("b")])
    assert not p.codec_allowed("zip", 0, 1)


@pytest.mark.parametrize("policy", ["search", "gnn"])
def test_policies_put_the_learned_codec_on_its_edge_and_int8_elsewhere(policy):
    graph, cluster = instance()
    plan = solve(Problem(graph, cluster, table()), policy, Options(tp=False, seed=1))
    assert dict(plan.codecs) == {("a", "b"): "int8", ("b", "c"): "learned",
                                 ("c", "d"): "int8"}
    # the same codec without the restriction is the cheapest on every edge: the
    # restriction, not its cost, keeps it off the other two
    free = CodecSpec("learned", 0.001, 0.0, 0.0)
    plan = solve(Problem(graph, cluster, table(free)), policy, Options(tp=False, seed=1))
    assert set(plan.codecs.values()) == {"learned"}


def test_a_plan_with_the_codec_on_another_edge_is_refused():
    graph, cluster = instance()
    assignments = {TaskId(t): (DeviceId(d),) for t, d in PINS.items()}
    ok = Plan(assignments, {(TaskId("b"), TaskId("c")): "learned"})
    assert simulate(graph, cluster, ok, table()).feasible
    bad = Plan(assignments, {(TaskId("a"), TaskId("b")): "learned"})
    with pytest.raises(InvalidInput, match=r"codec 'learned' on a->b: it is valid on b->c "
                                           r"only"):
        simulate(graph, cluster, bad, table())
    with pytest.raises(InvalidInput, match="unknown codec 'zip'"):
        simulate(graph, cluster, Plan(assignments, {(TaskId("a"), TaskId("b")): "zip"}),
                 table())


def test_a_codec_restricted_to_edges_of_another_graph_is_never_offered():
    graph, cluster = instance()
    elsewhere = CodecSpec("learned", 0.001, 0.0, 0.0, edges=frozenset({("conv1", "conv2")}))
    plan = solve(Problem(graph, cluster, table(elsewhere)), "search", Options(tp=False))
    assert "learned" not in plan.codecs.values() and plan.codecs


def test_a_replan_with_the_measured_table_keeps_the_learned_codec():
    """A device joins (a second server); re-planned with the table the plan was made
    with, the learned codec stays on its edge. The default table does not know it: it
    is dropped."""
    from edgeswarm.placement.replan import replan

    graph, cluster = instance()
    plan = solve(Problem(graph, cluster, table()), "search", Options(tp=False, seed=1))
    grown = Cluster((*cluster.devices, Device(DeviceId("srv2"), 1e9, 1 << 30)),
                    default_link=cluster.default_link)
    kept = replan(plan, graph, grown, "search", Options(tp=False, codecs=True, seed=1),
                  codec_table=table())
    assert kept.plan.codecs.get(("b", "c")) == "learned"
    assert simulate(graph, grown, kept.plan, table()).makespan == pytest.approx(
        kept.plan.predicted_latency_s)
    dropped = replan(plan, graph, grown, "search", Options(tp=False, codecs=True, seed=1))
    assert "learned" not in dropped.plan.codecs.values()
