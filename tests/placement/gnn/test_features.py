"""What the GNN policy sees: shapes, meaning and the feasibility mask of its features."""

import numpy as np
import pytest

from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.gnn.features import (
    CODEC,
    CODEC_FEATURES,
    DEVICE_FEATURES,
    EDGE_FEATURES,
    OPTION_FEATURES,
    RELOCATE,
    TASK_FEATURES,
    observe,
)
from edgeswarm.placement.gnn.improve import _apply, _Graph
from edgeswarm.placement.gnn.tables import Tables
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import evaluate, violation
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

IS_CURRENT, COMP_S = 2, 1   # columns of the option features


def _observe(p, groups, codecs=None, tp=True, use_codecs=True):
    g = _Graph(Tables.of(p))
    tl = evaluate(p, groups)
    pos = np.empty(p.n, dtype=np.int64)
    pos[p.default_order] = np.arange(p.n)
    obs = observe(g.tb, groups, codecs or {}, tl, tl.makespan, pos, tp=tp,
                  use_codecs=use_codecs)
    return g, tl, obs


def test_shapes_and_finite_values_on_the_heft_paper_instance(heft_paper):
    p = Problem(*heft_paper)
    groups = heft_groups(p)
    g, tl, obs = _observe(p, groups)
    n, m = p.n, p.m
    assert obs.x_task.shape == (n, TASK_FEATURES)
    assert obs.x_dev.shape == (m, DEVICE_FEATURES)
    assert obs.x_opt.shape == (n * m, OPTION_FEATURES)   # every task may run anywhere
    assert obs.msg_attr.shape == (2 * len(p.graph.edges), EDGE_FEATURES)
    assert obs.x_codec.shape[1] == CODEC_FEATURES
    for x in (obs.x_task, obs.x_dev, obs.x_opt, obs.msg_attr, obs.x_codec, obs.prior):
        assert np.isfinite(x).all()
    # exactly the current placements are marked, and compute time is the table's
    current = obs.x_opt[:, IS_CURRENT] == 1.0
    assert current.sum() == n
    tb = g.tb
    assert all(groups[t] == (d,) for t, d in zip(tb.opt_t[current], tb.opt_d[current],
                                                 strict=True))
    assert np.allclose(obs.x_opt[:, COMP_S], tb.comp[tb.opt_t, tb.opt_d] / tl.makespan)
    # relocations: every option except the current ones; codecs: cut edges only
    relocate = obs.cand_kind == RELOCATE
    assert relocate.sum() == n * m - n
    assert not current[obs.cand_opt[relocate]].any()
    cut = {(s, d) for s in range(n) for d, _ in p.succs[s] if groups[s] != groups[d]}
    edges = {(int(tb.es[e]), int(tb.ev[e])) for e in obs.codec_edge}
    assert edges == cut
    assert CODEC == 3


def test_slack_is_zero_on_the_critical_path_and_positive_elsewhere(heft_paper):
    p = Problem(*heft_paper)
    groups = heft_groups(p)
    _, tl, obs = _observe(p, groups)
    slack = obs.x_task[:, 2]
    last = int(np.argmax(tl.end))
    assert slack[last] == pytest.approx(0.0)
    assert (slack >= 0).all() and (slack > 0).any()


def test_memory_mask_is_exactly_the_simulators_verdict():
    # three devices; the small one holds only one of the big tasks
    big = 600
    tasks = tuple(Task(TaskId(f"t{i}"), 1e9, big if i % 2 else 10, 10) for i in range(6))
    edges = tuple(Edge(TaskId(f"t{i}"), TaskId(f"t{i + 1}"), 100) for i in range(5))
    cluster = Cluster((Device(DeviceId("a"), 1e9, 10_000), Device(DeviceId("b"), 2e9, 10_000),
                       Device(DeviceId("small"), 4e9, 700)),
                      default_link=LinkSpec(1e6, 1e-3))
    p = Problem(TaskGraph(tasks, edges), cluster)
    groups = heft_groups(p)
    assert not violation(p, groups)
    g, _, obs = _observe(p, groups, use_codecs=False)
    n_opt = len(obs.cand_kind)
    infeasible = 0
    for i in range(n_opt):
        new_groups, _ = _apply(g, obs, i, groups, {}, False)
        verdict = not violation(p, new_groups)
        assert bool(obs.feasible[i]) == verdict, (i, new_groups)
        infeasible += not verdict
    assert infeasible > 0


def test_tensor_parallel_candidates_only_for_splittable_tasks(make_instance):
    graph, cluster = make_instance(3, tasks=16, devices=5, splittable=0.3)
    p = Problem(graph, cluster)
    groups = heft_groups(p)
    g, _, obs = _observe(p, groups, tp=True)
    moved = g.tb.opt_t[obs.cand_opt[obs.cand_kind != RELOCATE]]
    assert len(moved) > 0
    assert all(p.splittable[t] for t in moved)
    _, _, no_tp = _observe(p, groups, tp=False)
    assert (no_tp.cand_kind == RELOCATE).all()
