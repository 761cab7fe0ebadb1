"""Collectives of a tensor-parallel group over real gloo data planes (threads), and the
cost model that picks the all-reduce algorithm."""

import numpy as np
import pytest
import torch

from edgeswarm.device_agent.dataplane import Shaping
from edgeswarm.models.tp.collective import (
    ALGORITHMS,
    Collective,
    PlaneCollective,
    choose_algorithm,
    gather_last,
    gather_stack,
    predict_times,
)
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.problem import allreduce_times, cheapest_allreduce

GBIT_1MS = Shaping(latency_s=1e-3, bandwidth_Bps=125e6)


def test_the_cost_model_counts_message_steps_and_bytes():
    t = predict_times(2, 2304, GBIT_1MS, overhead_s={}, per_byte_s={})
    one = 1e-3 + 2304 / 125e6
    assert t["direct"] == pytest.approx(one)
    assert t["star"] == pytest.approx(2 * one)
    assert t["gloo"] == pytest.approx(2 * (1e-3 + 1152 / 125e6))
    t4 = predict_times(4, 4e6, GBIT_1MS, overhead_s={}, per_byte_s={})
    assert t4["gloo"] == pytest.approx(6 * (1e-3 + 1e6 / 125e6))  # 2 (k-1) steps of 1/k
    assert t4["star"] == pytest.approx(2 * (1e-3 + 4e6 / 125e6))


def test_auto_picks_the_cheapest_prediction():
    # latency-bound: the fewest message steps ...
    assert choose_algorithm(2, 2304, GBIT_1MS) == "direct"
    assert choose_algorithm(4, 2304, GBIT_1MS, overhead_s={}, per_byte_s={}) == "direct"
    # ... but without links what the transport spends per call decides: the star's two
    # messages for small tensors, gloo's ring (half the bytes a step) for large ones
    assert choose_algorithm(2, 2304, None) == "star"
    assert choose_algorithm(2, 8 * 128 * 384 * 4, None) == "gloo"
    assert choose_algorithm(4, 2304, None, overhead_s={"direct": 0.0, "star": 1e-4,
                                                       "gloo": 1e-4}, per_byte_s={}) == "direct"
    # bandwidth-bound over 4 members: the ring moves 1/4 of the bytes per step
    assert choose_algorithm(4, 64e6, GBIT_1MS, overhead_s={"direct": 1.0},
                            per_byte_s={}) == "gloo"
    # measured overheads override the step count
    assert choose_algorithm(2, 2304, None, overhead_s={"direct": 1e-3, "star": 3e-4,
                                                       "gloo": 2e-3}, per_byte_s={}) == "star"
    # the planner's choice (star or ring) uses the same function
    lat = [[0.0, 0.01], [0.01, 0.0]]
    inv = [[0.0, 1e-6], [1e-6, 0.0]]
    times = allreduce_times([0, 1], 1e6, lat, inv)
    assert cheapest_allreduce(times, ("star", "gloo")) == "gloo"
    assert times["gloo"] == pytest.approx(2 * (0.01 + 0.5))


@pytest.mark.parametrize("algorithm", ["direct", "star", "gloo", "auto"])
@pytest.mark.parametrize("size", [2, 3])
def test_all_reduce_sums_and_every_member_gets_the_same_bits(run_members, algorithm, size):
    parts = [torch.randn(4, 5, generator=torch.Generator().manual_seed(r)) for r in range(size)]
    big = [torch.randn(128, 576, generator=torch.Generator().manual_seed(9 + r))
           for r in range(size)]  # longer than the data plane's 64 KiB first chunk

    def member(coll: Collective):
        return coll.all_reduce(parts[coll.rank]), coll.all_reduce(big[coll.rank]), coll.stats

    results = run_members(size, member, algorithm=algorithm)
    for small, large, stats in results:
        assert torch.allclose(small, sum(parts), atol=1e-6)
        assert torch.allclose(large, sum(big), atol=1e-5)
        assert torch.equal(small, results[0][0]) and torch.equal(large, results[0][1])
        assert stats.calls == 2 and stats.bytes == (20 + 128 * 576) * 4
        assert stats.seconds > 0


def test_gathers_concatenate_and_stack(run_members):
    ranges = [(0, 2), (2, 5), (5, 6)]

    def member(coll: Collective):
        a, b = ranges[coll.rank]
        local = torch.arange(a, b, dtype=torch.float32).expand(2, b - a)
        return gather_last(coll, local, ranges, 6), gather_stack(coll, torch.full((2,), coll.rank
                                                                                  * 1.0))

    for full, stacked in run_members(3, member):
        assert torch.equal(full, torch.arange(6, dtype=torch.float32).expand(2, 6))
        assert torch.equal(stacked, torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))


def test_calibration_agrees_on_every_member(run_members):
    def member(coll: Collective):
        assert isinstance(coll, PlaneCollective)
        costs = coll.calibrate(rounds=4, sizes=(16, 4096), between=lambda: None)
        return costs, coll.algorithm_for(2304), coll.algorithm_for(10_000_000)

    results = run_members(2, member, algorithm="auto")
    assert results[0] == results[1]
    costs = results[0][0]
    for kind in ("overhead_s", "per_byte_s"):
        assert set(costs[kind]) == {"direct", "star", "gloo"}
        assert min(costs[kind].values()) >= 0


def test_a_shaped_ring_sleeps_its_hops(run_members):
    """Gloo's ring is not point to point: the plane emulates the link by sleeping what the
    ring's 2 (k - 1) hops of 1/k of the bytes would take on it."""
    slept: list[float] = []
    link = Shaping(latency_s=0.002, bandwidth_Bps=1e6)

    def member(coll: Collective):
        return coll.all_reduce(torch.ones(1000))

    run_members(2, member, algorithm="gloo", shaping={1: link}, sleep=slept.append)
    assert slept == [pytest.approx(2 * (0.002 + 2000 / 1e6))]


def test_unknown_algorithms_and_foreign_ranks_are_refused(run_members):
    def member(coll: Collective):
        assert isinstance(coll, PlaneCollective)
        with pytest.raises(InvalidInput, match="unknown all-reduce algorithm"):
            PlaneCollective(coll.plane, [0, 1], "tree")
        with pytest.raises(InvalidInput, match="not in the group"):
            PlaneCollective(coll.plane, [2, 3])
        with pytest.raises(InvalidInput, match="columns"):
            gather_last(coll, torch.zeros(3), [(0, 1), (1, 2)], 2)
        return True

    assert run_members(2, member) == [True, True]
    assert "auto" in ALGORITHMS


def test_direct_sums_in_group_order(run_members):
    """Floating-point sums depend on the order: "direct" adds the parts in group order on
    every member, so the replicas of the hidden state never drift apart."""
    values = [np.float32(1e8), np.float32(1.0), np.float32(-1e8)]

    def member(coll: Collective):
        return coll.all_reduce(torch.tensor([values[coll.rank]]))

    results = run_members(3, member, algorithm="direct")
    assert all(torch.equal(r, results[0]) for r in results)


def test_unframed_parts_of_one_size_and_two_shapes_stay_apart(run_members):
    """The data plane posts receives ahead by byte count: parts of equal size but another
    shape, and of another size in between, arrive where they belong."""
    def member(coll: Collective):
        r = coll.rank + 1.0
        return (coll.all_reduce(torch.full((4, 5), r)), coll.all_reduce(torch.full((20,), r)),
                coll.all_reduce(torch.full((3,), r)), coll.all_reduce(torch.full((4, 5), 2 * r)))

    for algorithm in ("star", "direct"):
        for a, b, c, d in run_members(3, member, algorithm=algorithm):
            assert torch.equal(a, torch.full((4, 5), 6.0))
            assert torch.equal(b, torch.full((20,), 6.0))
            assert torch.equal(c, torch.full((3,), 6.0))
            assert torch.equal(d, torch.full((4, 5), 12.0))
