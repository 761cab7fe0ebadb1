"""Device memory as tasks are placed one by one: the simulator's memory rule.

A device needs the parameters of its tasks (a tensor-parallel member holds its share,
in proportion to its speed) plus the largest input + output activation of any task it
runs. :func:`~edgeswarm.placement.simulator.memory` totals a whole plan with a
:class:`MemoryBook`; list schedulers (HEFT, PEFT, random, the re-plan repair, the GNN's
start plans) ask it for room as they place each task.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgeswarm.placement.problem import Group, Problem


class MemoryBook:
    """Bytes each device holds so far: parameters, and the peak activation."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        self.params = [0.0] * p.m
        self.peak = [0] * p.m

    def shares(self, t: int, g: Group) -> list[float]:
        """The parameter bytes of ``t`` each member of ``g`` holds."""
        p = self.p
        if len(g) == 1:
            return [float(p.param[t])]
        speed = [1.0 / p.comp[t][j] for j in g]
        total = sum(speed)
        return [p.param[t] * s / total for s in speed]

    def fits(self, t: int, g: Group) -> bool:
        """``t`` on ``g`` stays within every member's memory."""
        p, params, peak = self.p, self.params, self.peak
        act = p.in_bytes[t] + p.out[t]
        return all(params[j] + b + max(peak[j], act) <= p.dev_mem[j]
                   for j, b in zip(g, self.shares(t, g), strict=True))

    def room(self, t: int, devices: Iterable[int]) -> list[int]:
        """Those of ``devices`` with room for ``t`` alone (:meth:`fits` of each, at once:
        list schedulers ask this for every task)."""
        p, params, peak, mem = self.p, self.params, self.peak, self.p.dev_mem
        param, act = p.param[t], p.in_bytes[t] + p.out[t]
        return [j for j in devices
                if params[j] + param + (peak[j] if peak[j] > act else act) <= mem[j]]

    def add(self, t: int, g: Group) -> None:
        act = self.p.in_bytes[t] + self.p.out[t]
        for j, b in zip(g, self.shares(t, g), strict=True):
            self.params[j] += b
            if act > self.peak[j]:
                self.peak[j] = act

    def used(self) -> list[int]:
        """Bytes each device needs."""
        return [int(a + b) for a, b in zip(self.params, self.peak, strict=True)]
