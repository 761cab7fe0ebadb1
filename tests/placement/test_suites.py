"""Benchmark suites: sizes and ranges as the issue sets them, seeds, dynamic events."""

import json

import numpy as np
import pytest

from edgeswarm.placement import suites
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.problem import Problem

N = 12


def tasks(inst) -> int:
    return len(inst.graph.tasks)


def devices(inst) -> int:
    return len(inst.cluster.devices)


def test_suite_names():
    assert suites.SUITES == ("giph_grid", "headroom", "tiny", "dynamic", "tp", "speed")


@pytest.mark.parametrize("suite", suites.SUITES)
def test_build_is_seeded_and_named(suite):
    a = suites.build(suite, N)
    b = suites.build(suite, N)
    c = suites.build(suite, N, seed=1)
    assert len(a) == N
    assert [json.dumps(x.to_json()) for x in a] == [json.dumps(x.to_json()) for x in b]
    assert [x.to_json() for x in a] != [x.to_json() for x in c]
    assert len({x.name for x in a}) == N and all(x.name.startswith(suite) for x in a)
    assert all(x.params["suite"] == suite for x in a)
    for x in a:
        p = Problem(x.graph, x.cluster)
        assert all(p.allowed[t] for t in range(p.n))


def test_default_size_is_100():
    assert len(suites.build("tiny")) == 100


def test_giph_grid_settings():
    xs = suites.build("giph_grid", 25)
    assert {tasks(x) for x in xs} == {10, 20, 30, 40, 50}
    assert all(devices(x) == 20 for x in xs[0::2])
    assert all(15 <= devices(x) <= 24 for x in xs[1::2])
    assert {x.params["ccr"] for x in xs} == {0.1, 0.5, 1.0, 5.0, 10.0}
    # GiPH's device networks: speeds within ±40% of the mean, every task of one type
    speeds = [d.flops for x in xs for d in x.cluster.devices]
    assert min(speeds) >= 3e10 and max(speeds) <= 7e10
    assert all(t.devices for x in xs for t in x.graph.tasks)


def test_headroom_settings():
    xs = suites.build("headroom", N)
    assert all(50 <= tasks(x) <= 100 and 8 <= devices(x) <= 16 for x in xs)
    assert all(float(x.params["ccr"]) >= 5 and float(x.params["beta"]) >= 0.5 for x in xs)


def test_speed_settings():
    xs = suites.build("speed", N)
    assert all(tasks(x) == 50 and devices(x) == 16 for x in xs)


def test_training_draws_only_trained_suites():
    seen = {suites.sample_training(suites.training_rng(k)).params["suite"] for k in range(60)}
    assert "speed" not in seen and seen <= {*suites.TRAINED_ON, "between"}


def test_tiny_settings():
    xs = suites.build("tiny", 40)
    assert all(tasks(x) <= 8 and 2 <= devices(x) <= 3 for x in xs)


def test_tp_has_splittable_tasks():
    xs = suites.build("tp", N)
    assert all(50 <= tasks(x) <= 100 and 8 <= devices(x) <= 16 for x in xs)
    assert all(any(t.splittable for t in x.graph.tasks) for x in xs)


def test_dynamic_events():
    xs = suites.build_dynamic(6)
    assert [x.cluster.to_json() for x in xs] == \
        [x.cluster.to_json() for x in suites.build("dynamic", 6)]
    for x in xs:
        assert devices(x) == 20
        assert len(x.events) == len(x.changes) == suites.EVENTS == 20
        present = set(x.cluster.ids)
        gone: set[str] = set()
        speed = {d.id: d.flops for d in x.cluster.devices}
        for change, cluster in zip(x.changes, x.events, strict=True):
            moved = set(change.devices)
            assert len(moved) in (2, 4)
            if change.kind == "leave":
                assert moved <= present
                present -= moved
                gone |= moved
            else:
                assert change.kind == "join" and moved <= gone
                present |= moved
                gone -= moved
            assert set(cluster.ids) == present and len(present) >= 4
            for d in cluster.devices:
                if d.id not in moved:  # only rejoining devices change speed
                    assert d.flops == speed[d.id]
                speed[d.id] = d.flops
            Problem(x.graph, cluster)  # every task keeps a device
        assert {c.kind for c in x.changes} == {"leave", "join"}


def test_dynamic_rejoins_with_new_speeds():
    x = suites.build_dynamic(3)[0]
    first = {d.id: d.flops for d in x.cluster.devices}
    rejoined = [(d.id, d.flops) for c, cl in zip(x.changes, x.events, strict=True)
                if c.kind == "join" for d in cl.devices if d.id in c.devices]
    assert rejoined and any(f != first[d] for d, f in rejoined)


def test_unknown_suite_names_the_valid_ones():
    with pytest.raises(InvalidInput, match="giph_grid, headroom, tiny, dynamic, tp"):
        suites.build("nope")
    with pytest.raises(InvalidInput, match="n must be"):
        suites.build("tiny", -1)


def test_training_draws_are_seeded_and_disjoint_from_evaluation():
    assert suites.TRAIN_SEED_BASE == 1_000_000
    assert suites.TRAIN_SEED_BASE > suites.EVAL_SEED_BASE + suites.DEFAULT_N
    a = suites.sample_training(suites.training_rng(3))
    b = suites.sample_training(suites.training_rng(3))
    assert json.dumps(a.to_json()) == json.dumps(b.to_json())
    draws = [suites.sample_training(suites.training_rng(k)) for k in range(40)]
    kinds = {str(x.params["suite"]) for x in draws}
    assert "between" in kinds and len(kinds) >= 4
    sizes = [tasks(x) for x in draws]
    assert min(sizes) < 20 and max(sizes) > 40
    assert any(any(t.splittable for t in x.graph.tasks) for x in draws)
    evals = {json.dumps(x.graph.to_json()) for s in ("giph_grid", "tiny")
             for x in suites.build(s, 20)}
    assert not evals & {json.dumps(x.graph.to_json()) for x in draws}


def test_instance_rng_depends_on_suite_index_and_seed():
    def first(*args):
        return suites.instance_rng(*args).integers(1 << 62)
    assert first("tiny", 0) == first("tiny", 0)
    assert len({first("tiny", 0), first("tp", 0), first("tiny", 1), first("tiny", 0, 1),
                np.random.default_rng(suites.TRAIN_SEED_BASE).integers(1 << 62)}) == 5
