"""The memory book list schedulers check room with is the simulator's memory rule."""

import copy

import numpy as np
import pytest

from edgeswarm.placement.memory import MemoryBook
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import memory, violation


@pytest.mark.parametrize("seed", range(4))
def test_the_book_keeps_the_simulators_memory_rule(make_instance, seed):
    """A plan built while the book says each task fits (alone or as a tensor-parallel
    group) needs exactly the bytes the simulator counts and is within memory; a refused
    group would have put a member over; ``room`` is ``fits`` of each device."""
    rng = np.random.default_rng(seed)
    graph, cluster = make_instance(seed, tasks=25, devices=5, splittable=0.3,
                                   memory=55 << 20)
    p = Problem(graph, cluster)
    book = MemoryBook(p)
    groups = [()] * p.n
    refused = 0
    for t in p.topo:
        allowed = list(p.allowed[t])
        room = book.room(t, allowed)
        assert room == [j for j in allowed if book.fits(t, (j,))]
        g = (int(rng.choice(allowed)),)
        if p.splittable[t] and len(allowed) > 1 and rng.uniform() < 0.5:
            g = tuple(int(x) for x in rng.choice(allowed, size=2, replace=False))
        if not book.fits(t, g):
            refused += 1
            over = copy.deepcopy(book)
            over.add(t, g)
            assert any(over.params[j] + over.peak[j] > p.dev_mem[j] for j in g)
            if not room:
                pytest.skip("the draw left a task without room")
            g = (min(room, key=lambda j: book.params[j]),)  # the emptiest
        book.add(t, g)
        groups[t] = g
    assert refused > 0  # the memory was tight enough to test refusals
    assert book.used() == memory(p, groups)
    assert violation(p, groups) == ""


def test_a_tensor_parallel_member_holds_a_share_in_proportion_to_its_speed():
    from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
    from edgeswarm.placement.taskgraph import Task, TaskGraph, TaskId

    def book(y_memory: int) -> MemoryBook:
        graph = TaskGraph((Task(TaskId("a"), 1e9, 900, 100, splittable=True),), ())
        cluster = Cluster((Device(DeviceId("x"), 1e9, 1 << 20),
                           Device(DeviceId("y"), 2e9, y_memory)),
                          default_link=LinkSpec(1e6, 1e-3))
        return MemoryBook(Problem(graph, cluster))

    assert book(700).shares(0, (0, 1)) == pytest.approx([300.0, 600.0])
    # y, twice as fast, holds 600 parameter bytes plus the task's 100 output bytes
    assert book(700).fits(0, (0, 1)) and not book(699).fits(0, (0, 1))
    full = book(700)
    full.add(0, (0, 1))
    assert full.used() == [400, 700]
