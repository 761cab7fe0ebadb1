"""Shared by the tensor-parallel tests: members as threads of this process, each with its
own real gloo data plane on loopback (a device would have the same, in its own process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _support import together as _together

from edgeswarm.device_agent.dataplane import DataPlane, StoreHost
from edgeswarm.models.tp.collective import Collective, PlaneCollective, Solo

TIMEOUT_S = 20.0
#: Joining waits for every member (and, in sandboxes, for reverse DNS): only joins get it.
JOIN_S = 60.0

RunMembers = Callable[..., list[Any]]



def together(*fns: Callable[[], Any], deadline_s: float = 120.0) -> list[Any]:
    return _together(*fns, deadline_s=deadline_s)


@pytest.fixture
def run_members(no_leaked_threads: None) -> Iterator[RunMembers]:
    """``run_members(size, fn, algorithm="star", **plane_kwargs)``: ``fn(coll)`` on every
    member of a group of ``size`` (``Solo`` for 1), concurrently; their results in order."""
    planes: list[DataPlane] = []
    with StoreHost() as host:
        generation = iter(range(1, 1000))

        def run(size: int, fn: Callable[[Collective], Any], algorithm: str = "star",
                **plane_kwargs: Any) -> list[Any]:
            if size == 1:
                return [fn(Solo())]
            gen = next(generation)

            def member(rank: int) -> Any:
                plane = DataPlane("127.0.0.1", host.port, rank, size, gen, timeout_s=TIMEOUT_S,
                                  join_timeout_s=JOIN_S, **plane_kwargs)
                planes.append(plane)
                return fn(PlaneCollective(plane, range(size), algorithm))

            return together(*[lambda r=r: member(r) for r in range(size)])

        yield run
        for p in planes:
            p.close()
