"""PEFT (Arabnejad and Barbosa, IEEE TPDS 2014): Predict Earliest Finish Time.

HEFT looks one task ahead; PEFT also looks at what comes after it. Its Optimistic Cost
Table holds, for every task t and device k, the longest way from t to an exit task when
t runs on k and every later task picks its best device, ignoring device contention:

    OCT(t, k) = max over successors s of  min over devices w of
                OCT(s, w) + compute(s, w) + (mean communication of t→s if w ≠ k)

A task's priority is its mean OCT over the devices it may run on (rank_oct); among the
ready tasks the one with the highest rank goes next, to the device minimizing the
optimistic finish EFT + OCT (insertion-based, devices without room for it skipped). The
order it used is returned with the placement, so the simulator replays its schedule.
"""

from __future__ import annotations

import heapq

from edgeswarm.placement.baselines import no_room
from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.policies import Options, Solution
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import ListScheduler


def optimistic_cost_table(p: Problem) -> list[list[float]]:
    """OCT[t][k] for every task ``t`` and device ``k`` (0 for exit tasks)."""
    table = [[0.0] * p.m for _ in range(p.n)]
    for t in reversed(p.topo):
        row = table[t]
        for s, nbytes in p.succs[t]:
            comm = p.mean_comm(nbytes)
            via = [table[s][w] + p.comp[s][w] for w in range(p.m)]  # INF where not allowed
            elsewhere = min(via) + comm  # the best device, paying the transfer
            for k in range(p.m):
                # staying on k costs no transfer; min(via) + comm >= via[k] when k is best
                cost = min(via[k], elsewhere)
                if cost > row[k]:
                    row[k] = cost
    return table


def rank_oct(p: Problem, table: list[list[float]]) -> list[float]:
    return [sum(table[t][k] for k in p.allowed[t]) / len(p.allowed[t]) for t in range(p.n)]


def solve(p: Problem, opts: Options) -> Solution:
    """PEFT as a registered policy (no tensor parallelism, no codecs)."""
    table = optimistic_cost_table(p)
    rank = rank_oct(p, table)
    pos = {t: i for i, t in enumerate(p.topo)}  # ties: earlier in topological order
    waiting = [len(p.preds[t]) for t in range(p.n)]
    ready = [(-rank[t], pos[t], t) for t in range(p.n) if waiting[t] == 0]
    heapq.heapify(ready)
    ls = ListScheduler(p)
    book = MemoryBook(p)
    order: list[int] = []
    while ready:
        _, _, t = heapq.heappop(ready)
        # the least optimistic finish: EFT + OCT
        _, best_j = ls.first_finish(t, book.room(t, p.allowed[t]), table[t])
        if best_j < 0:
            raise no_room(p, t)
        ls.place(t, (best_j,))
        book.add(t, (best_j,))
        order.append(t)
        for s, _ in p.succs[t]:
            waiting[s] -= 1
            if waiting[s] == 0:
                heapq.heappush(ready, (-rank[s], pos[s], s))
    return Solution(list(ls.groups), order=order)
