"""The arithmetic of uneven tensor-parallel splits: shares, GQA heads, MLP balancing."""

import itertools

import pytest

from edgeswarm.models.tp.split import (
    LayerShape,
    MemberSlice,
    kv_range,
    proportional,
    split_layers,
)
from edgeswarm.placement.errors import InvalidInput

SMOLLM2 = LayerShape(hidden=576, num_heads=9, num_kv_heads=3, intermediate=1536, vocab=49152)
MINILM = LayerShape(hidden=384, num_heads=12, num_kv_heads=12, intermediate=1536, vocab=30522,
                    mlp_matrices=2)


def test_proportional_is_largest_remainder():
    assert proportional(9, [1, 1]) == (5, 4)           # tie: the earlier member
    assert proportional(10, [1, 2, 2]) == (2, 4, 4)
    assert proportional(7, [0.5, 0.3, 0.2]) == (4, 2, 1)  # 3.5, 2.1, 1.4 -> floors 3,2,1 + 1
    assert proportional(5, [1, 0]) == (5, 0)
    assert proportional(3, [100, 1, 1], minimum=1) == (1, 1, 1)
    for total, weights in [(96, [3, 1, 1]), (49152, [1.7, 2.2, 0.4]), (1, [1, 1, 1])]:
        assert sum(proportional(total, weights)) == total


@pytest.mark.parametrize("bad", [[], [1, -1], [0, 0], [float("nan")], [float("inf"), 1],
                                 [True, 1]])
def test_proportional_refuses_bad_weights(bad):
    with pytest.raises(InvalidInput):
        proportional(10, bad)


def test_proportional_refuses_an_impossible_minimum():
    with pytest.raises(InvalidInput, match="at least 2"):
        proportional(3, [1, 1], minimum=2)


def covered(split, field):
    """The ranges of ``field`` tile [0, n) in member order."""
    ranges = [getattr(m, field) for m in split.members]
    return all(a[1] == b[0] for a, b in itertools.pairwise(ranges)) \
        and ranges[0][0] == 0


def test_smollm2_at_two_equal_devices_cuts_whole_kv_groups_and_balances_with_the_mlp():
    split = split_layers(SMOLLM2, [1.0, 1.0])
    a, b = split.members
    assert (a.q_heads, b.q_heads) == ((0, 6), (6, 9))    # 6/3: two kv groups and one
    assert (a.kv_heads, b.kv_heads) == ((0, 2), (2, 3))  # no kv head on both
    assert a.mlp[1] % 16 == 0 and b.mlp == (a.mlp[1], 1536)
    assert a.mlp[1] - a.mlp[0] < b.mlp[1] - b.mlp[0]     # the MLP evens out the attention
    assert a.vocab == (0, 24576) and b.vocab == (24576, 49152)
    assert split.imbalance() < 1.01
    # The alternative, 5/4 query heads with the straddled kv head on both and an even MLP,
    # is 2.4% off balance and computes a kv head twice (2% more work in all).
    d, h = SMOLLM2.head_dim, SMOLLM2.hidden
    q5 = 5 * (2 * d * h + 2 * 128 * d) + 2 * 2 * d * h + 768 * 3 * h
    q4 = 4 * (2 * d * h + 2 * 128 * d) + 2 * 2 * d * h + 768 * 3 * h
    assert max(q5, q4) / ((q5 + q4) / 2) > 1.02
    assert sum(split.work) < 0.985 * (q5 + q4)


def test_smollm2_at_four_devices_shares_straddling_kv_heads():
    split = split_layers(SMOLLM2, [1.0] * 4)
    q = [m.q_heads for m in split.members]
    assert q == [(0, 3), (3, 5), (5, 7), (7, 9)]
    kv = [m.kv_heads for m in split.members]
    assert kv == [kv_range(r, 3) for r in q] == [(0, 1), (1, 2), (1, 3), (2, 3)]
    for field in ("q_heads", "mlp", "vocab"):
        assert covered(split, field)
    assert split.members[-1].mlp[1] == 1536 and split.members[-1].vocab[1] == 49152
    assert split.imbalance() < 1.03


def test_shares_follow_speed():
    split = split_layers(MINILM, [3.0, 1.0])
    fast, slow = split.members
    assert fast.q_heads == (0, 9) and slow.q_heads == (9, 12)
    assert split.work[0] / split.work[1] == pytest.approx(3.0, rel=0.02)
    assert (fast.vocab[1] - fast.vocab[0]) / (slow.vocab[1] - slow.vocab[0]) \
        == pytest.approx(3.0, rel=1e-3)
    assert split.imbalance() < 1.01


def test_a_slow_member_still_gets_a_head_and_the_mlp_compensates():
    split = split_layers(MINILM, [100.0, 1.0])
    fast, slow = split.members
    assert slow.q_heads == (11, 12)
    # One head is more than a 1/101 share of the layer: the slow member gets no MLP column.
    assert slow.mlp[1] - slow.mlp[0] == 0
    assert fast.mlp == (0, 1536)
    assert split.work[1] < split.work[0] / 10


def test_one_member_holds_everything():
    split = split_layers(SMOLLM2, [2.5])
    (m,) = split.members
    assert m == MemberSlice((0, 9), (0, 3), (0, 1536), (0, 49152))
    assert split.imbalance() == pytest.approx(1.0)


@pytest.mark.parametrize(("speeds", "message"), [
    ([1.0] * 10, "cannot share 9 attention heads"),
    ([1.0, 0.0], "finite and positive"),
    ([1.0, -2.0], "finite and positive"),
    ([], "at least one member"),
])
def test_impossible_splits_are_refused(speeds, message):
    with pytest.raises(InvalidInput, match=message):
        split_layers(SMOLLM2, speeds)


def test_an_mlp_width_off_the_granule_is_refused():
    with pytest.raises(InvalidInput, match="granule"):
        split_layers(SMOLLM2, [1.0, 1.0], granule=10)


def test_a_bad_layer_shape_is_refused():
    with pytest.raises(InvalidInput, match="divide"):
        LayerShape(hidden=576, num_heads=9, num_kv_heads=2, intermediate=16, vocab=10)
    with pytest.raises(InvalidInput, match="positive int"):
        LayerShape(hidden=0, num_heads=1, num_kv_heads=1, intermediate=16, vocab=10)


def test_a_member_slice_round_trips_through_json():
    split = split_layers(SMOLLM2, [1.0, 2.0, 1.0])
    for m in split.members:
        assert MemberSlice.from_json(m.to_json()) == m
    with pytest.raises(InvalidInput, match="q_heads"):
        MemberSlice.from_json({"q_heads": [0, 1]})
    assert split.to_json()["members"][1] == split.members[1].to_json()
