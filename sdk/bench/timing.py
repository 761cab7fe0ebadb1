"""Timing helpers shared by the benchmarks: interleaved rounds, medians, bounded loops."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence


def interleaved(calls: Sequence[Callable[[], object]], rounds: int, budget_s: float,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Time each call once per round, round-robin, so drift hits all of them alike.

    Stops after ``rounds`` rounds or once ``budget_s`` has passed (at least one round).
    Returns the seconds of every call, one list per call.
    """
    samples: list[list[float]] = [[] for _ in calls]
    start = clock()
    for _ in range(max(1, rounds)):
        for i, call in enumerate(calls):
            t0 = clock()
            call()
            samples[i].append(clock() - t0)
        if clock() - start > budget_s:
            break
    return samples


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")
