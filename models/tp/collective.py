"""The collectives a tensor-parallel member needs, over the agent's gloo data plane.

A member program sees a :class:`Collective`: ``all_reduce`` (sum over the group) and the
two gathers built on it. :class:`Solo` is the group of one (no communication: the 1-device
baseline runs the same program); :class:`PlaneCollective` runs each all-reduce on a
:class:`~edgeswarm.device_agent.dataplane.DataPlane` with one of its algorithms:

- "gloo": gloo's own ring all-reduce (reduce-scatter + all-gather, ``2 (k - 1)`` steps);
- "star": through ``group[0]``, which the runner makes the fastest member (two steps);
- "direct": every member sends its part to every other (one step; ``k - 1`` messages out);
- "auto": per tensor size, the cheapest by :func:`~edgeswarm.placement.problem.allreduce_times`,
  the cost model the planner prices tensor-parallel groups with, fed this member's links
  and, once :meth:`PlaneCollective.calibrate` ran, what each algorithm costs per call on
  this group beyond the links. Both matter here: on a loopback the links cost nothing
  and the transport is everything (gloo's ring runs on a worker thread: ~2 ms a call on
  a busy 2-core machine, against ~0.3 ms for the star's two messages; two members sending
  to each other at once contend for gloo's per-connection lock with its I/O thread on
  their single core, so "direct" is slower than its one step suggests).

Decoding one token is latency-bound (61 all-reduces of 2.3 KB), so the counts matter as
much as the algorithm: the member programs need one all-reduce per sub-block and fuse the
greedy choice of the next token with the lookup of its embedding (:meth:`Collective.gather`).

Each call is timed (``stats``): the per-collective latency the bench reports, waiting for
the slowest member included.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.problem import ALLREDUCE_ALGORITHMS, allreduce_times, cheapest_allreduce

if TYPE_CHECKING:
    from edgeswarm.device_agent.dataplane import DataPlane, Shaping

__all__ = [
    "ALGORITHMS",
    "DEFAULT_OVERHEAD_S",
    "DEFAULT_PER_BYTE_S",
    "Collective",
    "CollectiveStats",
    "PlaneCollective",
    "Program",
    "Solo",
    "choose_algorithm",
    "drive",
    "gather_last",
    "gather_stack",
    "predict_times",
]

#: What a member may ask for: a data-plane algorithm, or "auto" (the cost model picks).
ALGORITHMS = ("auto", *ALLREDUCE_ALGORITHMS)
#: Seconds per call each algorithm spends beyond the links, on a loopback of this
#: 2-core machine under load (decode-sized tensors, two members with work between calls):
#: what "auto" assumes until :meth:`PlaneCollective.calibrate` measured the real group.
DEFAULT_OVERHEAD_S = {"direct": 8e-4, "star": 3e-4, "gloo": 2e-3}
#: ... and per byte of the tensor (copies, framing, loopback: the star moves every byte
#: twice in turn, the ring half of them per step), measured the same way (1.5 MB tensors).
DEFAULT_PER_BYTE_S = {"direct": 3.0e-9, "star": 2.7e-9, "gloo": 0.4e-9}


@dataclass
class CollectiveStats:
    """How many all-reduces ran and the seconds they took (by this member's clock)."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0
    by_algorithm: dict[str, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0
        self.by_algorithm.clear()

    @property
    def mean_ms(self) -> float:
        return 1e3 * self.seconds / self.calls if self.calls else 0.0


class Collective(Protocol):
    """Sum and gathers over a tensor-parallel group; every member calls them in the same
    order with tensors of the same shape."""

    rank: int   # this member's index in the group
    size: int
    stats: CollectiveStats

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def start(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Begin an all-reduce and return at once; the sum arrives in the future. Started
        ones run in order, one at a time; no ``all_reduce`` while one is pending."""
        ...

    def close(self) -> None: ...


def _done(t: torch.Tensor) -> Future[torch.Tensor]:
    f: Future[torch.Tensor] = Future()
    f.set_result(t)
    return f


class Solo:
    """The group of one: every collective is the identity."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.stats = CollectiveStats()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def start(self, t: torch.Tensor) -> Future[torch.Tensor]:
        return _done(t)

    def close(self) -> None:
        pass


def predict_times(size: int, nbytes: float, link: Shaping | None,
                  overhead_s: Mapping[str, float] | None = None,
                  per_byte_s: Mapping[str, float] | None = None) -> dict[str, float]:
    """Seconds of each algorithm for ``size`` members joined by identical ``link`` s, plus
    the transport's ``overhead_s + per_byte_s * nbytes`` per call (None: the defaults
    measured here; ``{}``: nothing, the links alone)."""
    fixed = DEFAULT_OVERHEAD_S if overhead_s is None else overhead_s
    slope = DEFAULT_PER_BYTE_S if per_byte_s is None else per_byte_s
    overhead_s = {a: fixed.get(a, 0.0) + slope.get(a, 0.0) * nbytes
                  for a in ALLREDUCE_ALGORITHMS}
    lat = link.latency_s if link is not None else 0.0
    inv_bw = 1.0 / link.bandwidth_Bps if link is not None and link.bandwidth_Bps else 0.0
    lats = [[0.0 if i == j else lat for j in range(size)] for i in range(size)]
    inv = [[0.0 if i == j else inv_bw for j in range(size)] for i in range(size)]
    return allreduce_times(list(range(size)), nbytes, lats, inv, overhead_s=overhead_s)


def choose_algorithm(size: int, nbytes: float, link: Shaping | None,
                     overhead_s: Mapping[str, float] | None = None,
                     per_byte_s: Mapping[str, float] | None = None) -> str:
    """The algorithm "auto" runs for a tensor of ``nbytes`` over ``size`` members."""
    return cheapest_allreduce(predict_times(size, nbytes, link, overhead_s, per_byte_s))


class PlaneCollective:
    """All-reduces over ``plane`` among the data-plane ranks ``group`` (fastest first: the
    star's root). ``link``: the emulated link to the peers, for "auto"'s prediction."""

    def __init__(self, plane: DataPlane, group: Sequence[int], algorithm: str = "auto",
                 link: Shaping | None = None) -> None:
        if algorithm not in ALGORITHMS:
            raise InvalidInput(f"unknown all-reduce algorithm {algorithm!r}: choose one of "
                               f"{', '.join(ALGORITHMS)}")
        self.group = tuple(group)
        if plane.rank not in self.group:
            raise InvalidInput(f"data-plane rank {plane.rank} is not in the group "
                               f"{list(self.group)}")
        self.plane = plane
        self.rank = self.group.index(plane.rank)
        self.size = len(self.group)
        self.algorithm = algorithm
        self.link = link
        self.stats = CollectiveStats()
        #: Seconds per call and per byte of each algorithm beyond the links
        #: (``calibrate``); None: :data:`DEFAULT_OVERHEAD_S`, :data:`DEFAULT_PER_BYTE_S`.
        self.overhead_s: dict[str, float] | None = None
        self.per_byte_s: dict[str, float] | None = None
        self._chosen: dict[int, str] = {}
        #: Runs started all-reduces: one thread, so the plane still sees one caller at a
        #: time (it is not thread-safe), and in the order they were started.
        self._worker: ThreadPoolExecutor | None = None
        self._pending: Future[torch.Tensor] | None = None

    def algorithm_for(self, nbytes: int) -> str:
        """What a tensor of ``nbytes`` is all-reduced with (the same on every member)."""
        if self.algorithm != "auto":
            return self.algorithm
        chosen = self._chosen.get(nbytes)
        if chosen is None:
            chosen = self._chosen[nbytes] = choose_algorithm(
                self.size, nbytes, self.link, self.overhead_s, self.per_byte_s)
        return chosen

    def calibrate(self, rounds: int = 20, sizes: tuple[int, int] = (576, 147_456),
                  between: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
        """Time every algorithm on this group at two sizes (``rounds`` calls of ``sizes``
        float32 each, half as many for the larger; ``between`` runs before each call: by
        default about 0.1 ms of matrix-vector work, as a member computes between two
        all-reduces) and keep, per algorithm, a fixed and a per-byte cost beyond what the
        links explain. Every member calls it; they agree on the mean, so "auto" then picks
        the same algorithm everywhere. Returns ``{"overhead_s": ..., "per_byte_s": ...}``."""
        small, large = sizes
        if rounds < 2 or not 0 < small < large:
            raise InvalidInput(f"calibration needs rounds >= 2 and two growing sizes, got "
                               f"{rounds} and {sizes}")
        if between is None:
            weight, x = torch.randn(1024, 576), torch.randn(1, 576)

            def between() -> object:
                return torch.nn.functional.linear(x, weight)

        beyond: list[float] = []
        for elements, n in ((small, rounds), (large, rounds // 2)):
            probe = np.zeros(elements, dtype=np.float32)
            links = predict_times(self.size, probe.nbytes, self.link, overhead_s={},
                                  per_byte_s={})
            for algorithm in ALLREDUCE_ALGORITHMS:
                for _ in range(2):
                    self.plane.all_reduce(probe, self.group, algorithm, framed=False)
                total = 0.0
                for _ in range(n):
                    between()
                    start = time.perf_counter()
                    self.plane.all_reduce(probe, self.group, algorithm, framed=False)
                    total += time.perf_counter() - start
                beyond.append(max(0.0, total / n - links[algorithm]))
        agreed = self.plane.all_reduce(np.array(beyond, dtype=np.float32), self.group,
                                       "star") / self.size
        k = len(ALLREDUCE_ALGORITHMS)
        span = 4.0 * (large - small)
        self.per_byte_s, self.overhead_s = {}, {}
        for i, a in enumerate(ALLREDUCE_ALGORITHMS):
            t_small, t_large = float(agreed[i]), float(agreed[k + i])
            slope = max(0.0, (t_large - t_small) / span)
            self.per_byte_s[a] = slope
            self.overhead_s[a] = max(0.0, t_small - slope * 4.0 * small)
        self._chosen.clear()
        return {"overhead_s": dict(self.overhead_s), "per_byte_s": dict(self.per_byte_s)}

    def start(self, t: torch.Tensor) -> Future[torch.Tensor]:
        """Begin an all-reduce on the communication thread (created on first use, pinned
        where this thread is) so the caller computes meanwhile: the wait for the peers and
        the link overlap the next micro-batch's work."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="edgeswarm-tp-comm")
        self._pending = self._worker.submit(self._all_reduce, t.detach().contiguous())
        return self._pending

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._pending is not None and not self._pending.done():
            raise InvalidInput("an all-reduce is still pending on the communication thread: "
                               "wait for its result before a synchronous one")
        return self._all_reduce(t)

    def close(self) -> None:
        """Stop the communication thread (the plane stays open: its owner closes it)."""
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        a = t.detach().contiguous().numpy()
        algorithm = self.algorithm_for(a.nbytes)
        start = time.perf_counter()
        out = self.plane.all_reduce(a, self.group, algorithm, framed=False)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.bytes += a.nbytes
        self.stats.by_algorithm[algorithm] = self.stats.by_algorithm.get(algorithm, 0) + 1
        return torch.from_numpy(np.ascontiguousarray(out)).view(t.shape)


def gather_last(coll: Collective, local: torch.Tensor, ranges: Sequence[tuple[int, int]],
                total: int) -> torch.Tensor:
    """Concatenate every member's ``local`` ``[..., stop - start]`` along the last dimension
    into ``[..., total]`` on every member: an all-reduce of zero-padded slices (adding
    zeros is exact). For the correctness checks; the hot path never gathers logits."""
    start, stop = ranges[coll.rank]
    if local.shape[-1] != stop - start:
        raise InvalidInput(f"member {coll.rank} holds {local.shape[-1]} columns, its range "
                           f"[{start}, {stop}) has {stop - start}")
    full = local.new_zeros((*local.shape[:-1], total))
    full[..., start:stop] = local
    return coll.all_reduce(full)


def gather_stack(coll: Collective, part: torch.Tensor) -> torch.Tensor:
    """Every member's ``part`` (same shape on all) stacked into ``[size, *shape]``."""
    slots = part.new_zeros((coll.size, *part.shape))
    slots[coll.rank] = part
    return coll.all_reduce(slots)


#: A piece of work as a generator: it yields each partial sum it needs all-reduced, is sent
#: the total, and returns its result.
Program = Generator[torch.Tensor, torch.Tensor, torch.Tensor]


def drive(coll: Collective, programs: Sequence[Program]) -> list[torch.Tensor]:
    """Run ``programs`` to the end; their results in order.

    One program (or a group of one) runs straight through with synchronous all-reduces.
    Several take turns round robin: one's all-reduce is started on the communication
    thread and the next one computes until its own, so each wait for the peers overlaps
    another piece's work. Every member must drive the same pieces in the same order.
    """
    results: list[torch.Tensor] = [torch.empty(0)] * len(programs)
    if coll.size == 1 or len(programs) == 1:
        for idx, program in enumerate(programs):
            try:
                partial = next(program)
                while True:
                    partial = program.send(coll.all_reduce(partial) if coll.size > 1
                                           else partial)
            except StopIteration as stop:
                results[idx] = stop.value
        return results
    turns: deque[tuple[int, Program, Future[torch.Tensor]]] = deque(
        (idx, program, coll.start(next(program))) for idx, program in enumerate(programs))
    try:
        while turns:
            idx, program, pending = turns.popleft()
            try:
                turns.append((idx, program, coll.start(program.send(pending.result()))))
            except StopIteration as stop:
                results[idx] = stop.value
    finally:  # after an error, let the started all-reduces end before anyone else talks
        for _, _, pending in turns:
            pending.exception()
    return results
