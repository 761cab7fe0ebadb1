"""Measured codec profiles, the planner's codec table, and the planner using it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from edgeswarm.models import codecs
from edgeswarm.models.codecs.e2e import split_with_codec
from edgeswarm.models.codecs.profile import measure, profiled
from edgeswarm.models.graph import extract
from edgeswarm.placement.cluster import Cluster, Device, DeviceId, LinkSpec
from edgeswarm.placement.codecs import DEFAULT_CODECS
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.policies import Options, solve
from edgeswarm.placement.problem import Problem
from edgeswarm.placement.simulator import simulate

#: The issue's slow link: 10 Mbit/s, 20 ms.
SLOW_LINK = LinkSpec(bandwidth_Bps=10e6 / 8, latency_s=0.020)


class _Clock:
    """Advances one second per reading."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_measure_codes_every_sample_alone_and_times_with_the_clock():
    x = np.maximum(np.random.default_rng(0).normal(size=(5, 4, 8, 8)), 0).astype(np.float32)
    c = codecs.get("int8")
    m = measure(c, x, clock=_Clock(), timed=3)
    assert m.n == 5 and m.raw_bytes_per_sample == 4 * 8 * 8 * 4
    assert m.encode_s == 1.0 and m.decode_s == 1.0  # one tick between the readings
    sizes = [len(c.encode(x[i:i + 1])) for i in range(5)]
    assert m.bytes_per_sample == pytest.approx(np.mean(sizes))
    assert np.array_equal(m.decoded, np.concatenate([c.decode(c.encode(x[i:i + 1]))
                                                     for i in range(5)]))
    p = m.profile("test machine")
    assert p.ratio == pytest.approx(m.bytes_per_sample / 1024) and p.measured_on == "test machine"
    with pytest.raises(InvalidInput, match="at least one sample"):
        measure(c, x[:0])


def test_codec_table_puts_measured_codecs_over_the_defaults():
    x = np.maximum(np.random.default_rng(1).normal(size=(4, 32, 16, 16)), 0).astype(np.float32)
    measured = profiled([(c, measure(c, x)) for c in (codecs.get("fp16"), codecs.get("int8"))],
                        "here")
    table = codecs.codec_table(measured, device_flops=1e10)
    assert set(table) == set(DEFAULT_CODECS)
    assert table["int8"] != DEFAULT_CODECS["int8"]
    assert table["int8"].ratio == pytest.approx(measured[1].profile.ratio)
    assert table["fp16"].ratio == pytest.approx(0.5, abs=0.01)
    assert table["int8"].encode_flops_per_byte == pytest.approx(
        measured[1].profile.encode_s_per_byte * 1e10)


#: The camera is this machine (its codec profiles are measured here), the server 25x faster.
CAMERA_FLOPS = 2e9


def _camera_and_server(graph):
    """A slow camera that must read the input and a fast server that must answer."""
    cluster = Cluster((Device(DeviceId("camera"), CAMERA_FLOPS, 1 << 30),
                       Device(DeviceId("server"), 25 * CAMERA_FLOPS, 1 << 33)),
                      default_link=SLOW_LINK)
    pinned = {"input:input": ("camera",), "fc": ("server",)}
    tasks = tuple(replace(t, devices=pinned.get(t.id)) for t in graph.tasks)
    return replace(graph, tasks=tasks), cluster


@pytest.mark.slow
def test_the_planner_prefers_the_learned_codec_on_a_slow_link(scene, learned, one_thread):
    cs = split_with_codec(scene.module, scene.example_inputs, learned.split,
                          codecs.get("none"))
    with torch.inference_mode():
        (h,) = cs.head(scene.heldout.inputs[0][:40])
    feature = h.numpy()
    measured = profiled([(c, measure(c, feature)) for c in
                         (codecs.get("none"), codecs.get("int8"), learned)], "test")
    table = codecs.codec_table(measured, device_flops=CAMERA_FLOPS)
    assert learned.full_name in table and "bottleneck" not in table
    graph, cluster = _camera_and_server(extract(scene.module, scene.example_inputs))
    # the plan split_with_codec emits, costed with each codec on its cut edge
    latency = {}
    for c in measured:
        plan = split_with_codec(scene.module, scene.example_inputs, learned.split, c,
                                devices=("camera", "server")).plan
        latency[c.name] = simulate(graph, cluster, plan, table).makespan
    assert latency["learned"] < latency["int8"] < latency["none"]
    # the search policy, given the table, uses a codec and beats planning without one
    problem = Problem(graph, cluster, codec_table=table)
    with_codecs = solve(problem, "search", Options(budget=300, seed=0))
    without = solve(Problem(graph, cluster, codec_table=table), "search",
                    Options(budget=300, seed=0, codecs=False))
    assert with_codecs.codecs and set(with_codecs.codecs.values()) <= set(table)
    assert with_codecs.predicted_latency_s < without.predicted_latency_s
