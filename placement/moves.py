"""Moves: the small changes improvement policies make to a plan.

A state is a placement by index (``groups``: task → device group) and the codecs on
cut edges. Three kinds of move: relocate a task to one device; grow or shrink the
tensor-parallel group of a splittable task; switch the codec of a cut edge. Search and
the GNN policy enumerate the same moves, so they explore the same space.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from edgeswarm.placement.problem import Group, Problem

#: Largest tensor-parallel group a move may form.
MAX_GROUP = 8


@dataclass
class State:
    groups: list[Group]
    codecs: dict[tuple[int, int], str] = field(default_factory=dict)

    def copy(self) -> State:
        return State(list(self.groups), dict(self.codecs))


@dataclass(frozen=True)
class Relocate:
    task: int
    device: int

    def apply(self, s: State) -> State:
        out = s.copy()
        out.groups[self.task] = (self.device,)
        return out


@dataclass(frozen=True)
class Regroup:
    """Set a splittable task's tensor-parallel group (grow or shrink by one device)."""

    task: int
    group: Group

    def apply(self, s: State) -> State:
        out = s.copy()
        out.groups[self.task] = self.group
        return out


@dataclass(frozen=True)
class SetCodec:
    src: int
    dst: int
    codec: str

    def apply(self, s: State) -> State:
        out = s.copy()
        if self.codec == "none":
            out.codecs.pop((self.src, self.dst), None)
        else:
            out.codecs[(self.src, self.dst)] = self.codec
        return out


Move = Relocate | Regroup | SetCodec


def moves(p: Problem, s: State, tp: bool = True, codecs: bool = True,
          codec_names: Mapping[str, object] | None = None,
          tasks: Iterable[int] | None = None) -> Iterator[Move]:
    """Every move from ``s`` that respects the allowed devices (memory is checked later).

    With ``tasks``, only the moves that touch one of them: relocating or regrouping it,
    or a codec on an edge into or out of it.
    """
    only = set(tasks) if tasks is not None else None
    for t in range(p.n):
        if only is not None and t not in only:
            continue
        g = s.groups[t]
        for j in p.allowed[t]:
            if g != (j,):
                yield Relocate(t, j)
        if tp and p.splittable[t]:
            if len(g) < MAX_GROUP:
                for j in p.allowed[t]:
                    if j not in g:
                        yield Regroup(t, (*g, j))
            if len(g) > 1:
                for j in g:
                    yield Regroup(t, tuple(x for x in g if x != j))
    if codecs:
        names = list(codec_names if codec_names is not None else p.codec_table)
        for t in range(p.n):
            for d, _ in p.succs[t]:
                if only is not None and t not in only and d not in only:
                    continue
                if set(s.groups[d]) <= set(s.groups[t]):
                    continue  # not a cut edge: the data is already there
                current = s.codecs.get((t, d), "none")
                for name in names:
                    if name != current and p.codec_allowed(name, t, d):
                        yield SetCodec(t, d, name)
