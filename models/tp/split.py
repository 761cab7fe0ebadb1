"""How a transformer is cut across a tensor-parallel group: integer shares by device speed.

Megatron's split gives every member a slice of each layer: query heads (and the key/value
heads they read), MLP columns, vocabulary rows. TPI-LLM and exo cut evenly; here the shares
follow the members' speeds, and whatever cannot be even is balanced elsewhere:

- **Largest remainder.** A whole (heads, MLP granules, vocabulary rows) is shared in
  proportion to speed: everyone gets the floor of their quota, the largest fractional parts
  get the leftovers. Every member gets at least one head (a member without heads would
  still pay every all-reduce for nothing).
- **Grouped-query attention.** SmolLM2 has 9 query heads reading 3 key/value heads. Two
  ways to cut it are scored and the cheaper is kept: (a) query heads by speed, each member
  computing and caching every kv head its query heads read (a group that straddles two
  members is duplicated: 5/4 at two equal devices reads 2 + 2 of the 3 kv heads); (b) whole
  kv groups by speed, query heads following (6/3 at two devices, nothing duplicated). The
  attention imbalance of (b) is absorbed by the MLP, next.
- **The MLP balances the layer.** Attention slices are lumpy (a head is 1/9 of the
  attention); the MLP is fine-grained (1536 columns in granules of 16). The MLP columns are
  chosen so that each member's whole layer, attention included, is in proportion to its
  speed: at two equal devices SmolLM2 gets query heads 6/3 and MLP columns 672/864, each
  member within 0.4% of half the layer, and no kv projection computed twice. (Cutting
  5/4 with an even MLP puts 51.2% and 48.8% of the work on the two members, 2% more work
  in all.)

Work is counted in multiply-accumulates per token: the weights (two matrices per query head:
q and o rows; two per kv head: k and v; ``mlp_matrices`` per MLP column) plus the attention
scores and weighted sum, ``2 * context * head_dim`` per query head. Pure arithmetic: no
torch, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeswarm.placement.errors import InvalidInput

__all__ = ["LayerShape", "MemberSlice", "Split", "kv_range", "proportional", "split_layers"]

#: MLP columns are handed out in multiples of this (a SIMD-friendly width).
GRANULE = 16
#: Tokens a query attends to on average, for the work of the attention scores.
CONTEXT = 128


def proportional(total: int, weights: Sequence[float], minimum: int = 0) -> tuple[int, ...]:
    """``total`` split in proportion to ``weights`` by largest remainder, each >= ``minimum``.

    Ties among remainders go to the earlier member, so the result is deterministic.
    """
    _check_weights(weights, allow_zero=True)
    if total < 0 or minimum < 0:
        raise InvalidInput(f"cannot split {total} with a minimum of {minimum} each")
    n = len(weights)
    if minimum * n > total:
        raise InvalidInput(f"cannot give {n} members at least {minimum} each of {total}")
    free = total - minimum * n
    weight_sum = float(sum(weights))
    if weight_sum <= 0:
        raise InvalidInput("at least one weight must be positive")
    quotas = [free * w / weight_sum for w in weights]
    shares = [math.floor(q) for q in quotas]
    order = sorted(range(n), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[:free - sum(shares)]:
        shares[i] += 1
    return tuple(minimum + s for s in shares)


@dataclass(frozen=True)
class LayerShape:
    """What the split needs to know about one transformer layer (and the vocabulary)."""

    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int
    mlp_matrices: int = 3  # SwiGLU: gate, up, down; BERT: up, down

    def __post_init__(self) -> None:
        for name in ("hidden", "num_heads", "num_kv_heads", "intermediate", "vocab",
                     "mlp_matrices"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"layer shape: {name} must be a positive int, got {value!r}")
        if self.hidden % self.num_heads or self.num_heads % self.num_kv_heads:
            raise InvalidInput(f"layer shape: hidden {self.hidden}, heads {self.num_heads} and "
                               f"kv heads {self.num_kv_heads} must divide each other")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads


def kv_range(q_heads: tuple[int, int], group: int) -> tuple[int, int]:
    """The kv heads ``[start, stop)`` that query heads ``[start, stop)`` read."""
    start, stop = q_heads
    return start // group, -(-stop // group)


@dataclass(frozen=True)
class MemberSlice:
    """One member's part of every layer: ranges ``[start, stop)`` into the full model."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]
    vocab: tuple[int, int]

    def to_json(self) -> dict[str, list[int]]:
        return {"q_heads": list(self.q_heads), "kv_heads": list(self.kv_heads),
                "mlp": list(self.mlp), "vocab": list(self.vocab)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> MemberSlice:
        try:
            ranges = {key: (int(doc[key][0]), int(doc[key][1]))
                      for key in ("q_heads", "kv_heads", "mlp", "vocab")}
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInput(f"a member slice needs q_heads, kv_heads, mlp and vocab as "
                               f"[start, stop] ({exc!r})") from None
        return cls(**ranges)


@dataclass(frozen=True)
class Split:
    """Every member's slice, in member order, and the work each was given."""

    shape: LayerShape
    speeds: tuple[float, ...]
    members: tuple[MemberSlice, ...]
    #: Multiply-accumulates per token of one layer on each member (duplicated kv included).
    work: tuple[float, ...]

    @property
    def size(self) -> int:
        return len(self.members)

    def imbalance(self) -> float:
        """Slowest member's time over the ideal (1.0: perfectly in proportion to speed)."""
        ideal = sum(self.work) / sum(self.speeds)
        return max(w / s for w, s in zip(self.work, self.speeds, strict=True)) / ideal

    def to_json(self) -> dict[str, Any]:
        return {"speeds": list(self.speeds), "members": [m.to_json() for m in self.members],
                "work": list(self.work)}


def split_layers(shape: LayerShape, speeds: Sequence[float], granule: int = GRANULE,
                 context: int = CONTEXT) -> Split:
    """Cut every layer of a model with ``shape`` across members of the given ``speeds``.

    Raises InvalidInput for non-positive speeds, more members than query heads or
    vocabulary rows, or an MLP width that is not a multiple of ``granule``.
    """
    _check_weights(speeds, allow_zero=False)
    k = len(speeds)
    if k > shape.num_heads:
        raise InvalidInput(f"{k} members cannot share {shape.num_heads} attention heads: a "
                           f"tensor-parallel group has at most one member per head")
    if granule < 1 or shape.intermediate % granule:
        raise InvalidInput(f"MLP width {shape.intermediate} is not a multiple of the granule "
                           f"{granule}; pass a granule that divides it")
    candidates = [proportional(shape.num_heads, speeds, minimum=1)]
    if shape.group > 1 and k <= shape.num_kv_heads:
        groups = proportional(shape.num_kv_heads, speeds, minimum=1)
        candidates.append(tuple(g * shape.group for g in groups))
    best: Split | None = None
    for counts in candidates:
        split = _balanced(shape, tuple(float(s) for s in speeds), counts, granule, context)
        if best is None or (split.imbalance(), sum(split.work)) < (best.imbalance(),
                                                                   sum(best.work)):
            best = split
    assert best is not None
    return best


def _balanced(shape: LayerShape, speeds: tuple[float, ...], head_counts: tuple[int, ...],
              granule: int, context: int) -> Split:
    """Given the query heads of each member, MLP columns that even out the layer."""
    d, h = shape.head_dim, shape.hidden
    q_ranges = _ranges(head_counts)
    kv_ranges = [kv_range(r, shape.group) for r in q_ranges]
    attention = [(stop - start) * (2 * d * h + 2 * context * d) + (kv[1] - kv[0]) * 2 * d * h
                 for (start, stop), kv in zip(q_ranges, kv_ranges, strict=True)]
    column = shape.mlp_matrices * h
    total = sum(attention) + shape.intermediate * column
    # Water-filling: a member whose attention alone exceeds its share gets no MLP columns,
    # and the others share the rest in proportion to speed.
    active = set(range(len(speeds)))
    while True:
        pool = sum(speeds[i] for i in active)
        budget = total - sum(attention[i] for i in range(len(speeds)) if i not in active)
        wanted = {i: budget * speeds[i] / pool - attention[i] for i in active}
        negative = {i for i, w in wanted.items() if w < 0}
        if not negative:
            break
        active -= negative
    desired = [max(0.0, wanted.get(i, 0.0)) for i in range(len(speeds))]
    granules = proportional(shape.intermediate // granule, desired)
    mlp_ranges = _ranges(tuple(g * granule for g in granules))
    vocab_ranges = _ranges(proportional(shape.vocab, speeds, minimum=1)) \
        if len(speeds) <= shape.vocab else _too_many_for_vocab(shape, len(speeds))
    work = tuple(float(a + (m[1] - m[0]) * column)
                 for a, m in zip(attention, mlp_ranges, strict=True))
    members = tuple(MemberSlice(q, kv, m, v) for q, kv, m, v in
                    zip(q_ranges, kv_ranges, mlp_ranges, vocab_ranges, strict=True))
    return Split(shape, speeds, members, work)


def _too_many_for_vocab(shape: LayerShape, k: int) -> list[tuple[int, int]]:
    raise InvalidInput(f"{k} members cannot share a vocabulary of {shape.vocab} rows")


def _ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def _check_weights(weights: Sequence[float], allow_zero: bool) -> None:
    if isinstance(weights, (str, bytes)) or not len(weights):
        raise InvalidInput("a split needs at least one member speed")
    for w in weights:
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
        if not ok or w < 0 or (w == 0 and not allow_zero):
            raise InvalidInput(f"member speeds must be finite and positive, got {list(weights)}")
