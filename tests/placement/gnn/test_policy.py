"""The GNN policy's search: budget, never worse than HEFT, masks, determinism, checkpoint."""

import json
import shutil

import numpy as np
import pytest

from edgeswarm.placement.errors import ModelFileError
from edgeswarm.placement.gnn import checkpoint, improve, policy
from edgeswarm.placement.gnn.improve import SearchConfig
from edgeswarm.placement.gnn.network import GiphNet, NetConfig
from edgeswarm.placement.heft import heft_groups
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.policies import solve as solve_policy
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import evaluate, violation


@pytest.fixture(scope="module")
def untrained() -> GiphNet:
    """The network before training: it ranks moves by their heuristic prior alone."""
    net = GiphNet(NetConfig())
    net.eval()
    return net


def _makespan(p: Problem, sol: Solution) -> float:
    codecs = {k: p.codec_table[v] for k, v in sol.codecs.items()}
    calls = p.calls
    ms = evaluate(p, sol.groups, codecs, sol.order).makespan
    p.calls = calls
    return ms


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("budget", [None, 0, 1, 2, 3, 7])
def test_never_worse_than_heft_and_within_budget(make_instance, untrained, seed, budget):
    graph, cluster = make_instance(seed, tasks=14, devices=5, splittable=0.2)
    p = Problem(graph, cluster)
    heft = _makespan(p, Solution(heft_groups(p), order=list(p.default_order)))
    opts = Options(budget=budget)
    calls = p.calls
    ep = improve.improve(p, opts, untrained)
    used = p.calls - calls
    assert used == ep.calls <= opts.budget_for(p)
    if budget is None:
        assert used == opts.budget_for(p)   # the default budget is spent, not exceeded
    assert not violation(p, ep.solution.groups)
    assert _makespan(p, ep.solution) <= heft * (1 + 1e-12)


def test_improves_on_heft_when_communication_dominates(make_instance, untrained):
    graph, cluster = make_instance(5, tasks=30, devices=6)
    p = Problem(graph, cluster)
    heft = _makespan(p, Solution(heft_groups(p), order=list(p.default_order)))
    ep = improve.improve(p, Options(), untrained)
    assert _makespan(p, ep.solution) < 0.99 * heft


def test_start_plan_is_kept_when_nothing_beats_it(heft_paper, untrained):
    p = Problem(*heft_paper)
    start = Solution(heft_groups(p), order=list(p.default_order))
    ep = improve.improve(p, Options(start=start, codecs=False, tp=False), untrained)
    assert _makespan(p, ep.solution) <= 80.0
    assert ep.start_makespan == 80.0


@pytest.mark.parametrize("sample", [False, True])
def test_infeasible_moves_are_never_simulated(make_instance, untrained, monkeypatch, sample):
    # tight memory: about 40% of the moves would overflow a device
    graph, cluster = make_instance(8, tasks=20, devices=4, splittable=0.3, memory=40 << 20)
    p = Problem(graph, cluster)
    assert not violation(p, heft_groups(p))
    simulated = []
    real, real_from = improve.evaluate, improve.evaluate_from

    def checked(p_, groups, codecs=None, order=None):
        simulated.append(violation(p_, groups))
        return real(p_, groups, codecs, order)

    def checked_from(p_, groups, codecs, order, base, k):
        simulated.append(violation(p_, groups))
        return real_from(p_, groups, codecs, order, base, k)

    monkeypatch.setattr(improve, "evaluate", checked)
    monkeypatch.setattr(improve, "evaluate_from", checked_from)
    rng = np.random.default_rng(0) if sample else None
    ep = improve.improve(p, Options(budget=60), untrained, rng=rng)
    assert len(simulated) == ep.calls > 10
    assert simulated == [""] * len(simulated)


@pytest.mark.parametrize("sample", [False, True])
def test_no_plan_is_simulated_twice_and_start_plans_are_free(make_instance, untrained,
                                                             monkeypatch, sample):
    """A walk out of a local optimum tends to come back: plans already simulated are
    skipped, not paid for again. The start plans are list schedules whose timelines come
    with them (as HEFT's does), so only HEFT's plan and the moves cost calls."""
    graph, cluster = make_instance(6, tasks=12, devices=4)
    p = Problem(graph, cluster)
    simulated = []
    real, real_from = improve.evaluate, improve.evaluate_from

    def recorded(p_, groups, codecs=None, order=None):
        simulated.append((tuple(groups), tuple(sorted((codecs or {}).items()))))
        return real(p_, groups, codecs, order)

    def recorded_from(p_, groups, codecs, order, base, k):
        simulated.append((tuple(groups), tuple(sorted((codecs or {}).items()))))
        return real_from(p_, groups, codecs, order, base, k)

    monkeypatch.setattr(improve, "evaluate", recorded)
    monkeypatch.setattr(improve, "evaluate_from", recorded_from)
    rng = np.random.default_rng(1) if sample else None
    ep = improve.improve(p, Options(budget=200, codecs=False, tp=False), untrained, rng=rng)
    assert len(simulated) == ep.calls > 20
    assert len(set(simulated)) == len(simulated)
    # with a budget of 2 the one call after HEFT's plan goes to a move, not a start plan
    p2 = Problem(graph, cluster)
    simulated.clear()
    improve.improve(p2, Options(budget=2, codecs=False, tp=False), untrained)
    starts = {tuple(g) for g, *_ in improve.scratch_starts(
        improve.Tables.of(p2), list(p2.default_order), Options(codecs=False, tp=False))}
    assert len(simulated) == 2 and simulated[1][0] not in starts - {simulated[0][0]}


def test_sampling_is_seeded(make_instance, untrained):
    graph, cluster = make_instance(4, tasks=16, devices=5)
    runs = []
    for _ in range(2):
        p = Problem(graph, cluster)
        ep = improve.improve(p, Options(), untrained, SearchConfig(patience=4),
                             rng=np.random.default_rng(3), collect=True)
        runs.append([(t.forward, t.cand, t.reward) for t in ep.trials])
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_shipped_checkpoint_is_deterministic_and_registered(make_instance):
    graph, cluster = make_instance(9, tasks=25, devices=6, splittable=0.2)
    first = policy.solve(Problem(graph, cluster), Options())
    again = policy.solve(Problem(graph, cluster), Options())
    assert first == again
    plan = solve_policy(Problem(graph, cluster), "gnn")
    assert plan.schedule is not None and plan.schedule.feasible
    assert plan.simulator_calls <= 2 * 25
    meta = checkpoint.load().meta
    assert meta["metrics"]["episodes"] > 0


def test_checkpoint_is_small():
    for name in (checkpoint.WEIGHTS, checkpoint.CONFIG):
        assert (checkpoint.DEFAULT_DIR / name).stat().st_size < 1 << 20


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "bad-json",
                                    "other-features", "wrong-shape"])
def test_corrupt_checkpoint_raises_model_file_error(tmp_path, heft_paper, damage):
    for name in (checkpoint.WEIGHTS, checkpoint.CONFIG):
        shutil.copy(checkpoint.DEFAULT_DIR / name, tmp_path / name)
    weights, config = tmp_path / checkpoint.WEIGHTS, tmp_path / checkpoint.CONFIG
    if damage == "missing":
        weights.unlink()
    elif damage == "garbage":
        weights.write_bytes(b"\x00not safetensors" * 100)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "bad-json":
        config.write_text("{")
    else:
        doc = json.loads(config.read_text())
        if damage == "other-features":
            doc["features"]["option"] += 1
        else:
            doc["network"]["hidden"] += 1
        config.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="edgeswarm placement train"):
        policy.solve(Problem(*heft_paper), Options(), checkpoint=tmp_path)


def test_loaded_model_is_cached_per_path():
    assert checkpoint.load() is checkpoint.load(checkpoint.DEFAULT_DIR / checkpoint.CONFIG)
