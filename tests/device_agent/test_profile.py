"""The measured device profile: real matmul timings on this machine."""

import itertools
import platform
import time
from collections.abc import Callable

import pytest

from edgeswarm.device_agent import profile
from edgeswarm.device_agent.protocol import DeviceProfile
from edgeswarm.placement.cluster import Device, DeviceId
from edgeswarm.placement.errors import InvalidInput


def ticking(step_s: float = 0.01) -> Callable[[], float]:
    """A clock that advances ``step_s`` per reading: timings become exact repeat counts."""
    counter = itertools.count()
    return lambda: next(counter) * step_s


def test_profile_numbers_are_plausible() -> None:
    p = profile.measure("pi-1", seconds=0.15)
    assert p.id == "pi-1"
    assert 1e8 < p.flops < 1e15  # between a microcontroller and a data-centre GPU
    assert 1e8 < p.int8_ops < 1e16
    assert 0 < p.memory_bytes < 1 << 50
    assert p.cores >= 1
    assert p.speed == 1.0
    assert {"torch", "onnx", "onnx-int8", "safetensors"} <= set(p.runtimes)
    assert platform.machine() in p.platform
    assert DeviceProfile.model_validate_json(p.model_dump_json()) == p


def test_speed_scales_both_throughputs() -> None:
    # with a ticking clock each timing is a fixed number of repeats, so the ratio is exact
    real = profile.measure("d", seconds=0.06, clock=ticking())
    slow = profile.measure("d", speed=0.25, seconds=0.06, clock=ticking())
    assert slow.flops == pytest.approx(real.flops * 0.25)
    assert slow.int8_ops == pytest.approx(real.int8_ops * 0.25)
    assert slow.speed == 0.25
    assert slow.memory_bytes > 0


def test_timing_loop_counts_runs_against_the_clock() -> None:
    calls: list[int] = []
    rate = profile._ops_per_second(lambda: calls.append(1), 100.0, 0.05, ticking(0.01))
    # one warm-up, then 5 runs of 0.01 s each: 500 ops in 0.05 s
    assert len(calls) == 6
    assert rate == pytest.approx(100.0 * 5 / 0.05)


def test_to_device_gives_the_placement_vocabulary() -> None:
    p = profile.measure("jetson", speed=2.0, seconds=0.06)
    d = p.to_device()
    assert isinstance(d, Device)
    assert d == Device(DeviceId("jetson"), p.flops, p.memory_bytes, tuple(p.runtimes))


def test_int8_engines_agree_on_the_order_of_magnitude() -> None:
    via_ort, engine = profile.int8_ops(0.05)
    assert engine == "onnxruntime"
    via_torch = profile._int8_torch(0.05, time.perf_counter)
    assert via_torch > 1e8 and via_ort > 1e8
    assert 0.01 < via_torch / via_ort < 100


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InvalidInput, match="speed"):
        profile.measure("d", speed=0)
    with pytest.raises(InvalidInput, match="device name"):
        profile.measure("bad/name")
    with pytest.raises(InvalidInput, match="seconds"):
        profile.measure("d", seconds=-1)


def test_measuring_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys; from edgeswarm.device_agent import profile; "
            "profile.measure('d', seconds=0.05); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_timing_loops_stop_after_steps_or_seconds_whichever_is_first() -> None:
    calls: list[int] = []
    profile._ops_per_second(lambda: calls.append(1), 1.0, 10.0, ticking(0.01), steps=7)
    assert len(calls) == 1 + 7                      # a warm-up, then the 7 timed steps
    calls.clear()
    profile._ops_per_second(lambda: calls.append(1), 1.0, 0.03, ticking(0.01), steps=7)
    assert len(calls) == 1 + 3                      # the seconds ran out first
    with pytest.raises(InvalidInput, match="steps"):
        profile.measure("d", steps=0)


def test_int8_can_be_measured_after_the_rest() -> None:
    first = profile.measure("pi-1", speed=0.5, seconds=0.06, clock=ticking(),
                            measure_int8=False)
    assert first.int8_ops == 0.0 and first.flops > 0
    done = profile.with_int8(first, seconds=0.03, clock=ticking())
    whole = profile.measure("pi-1", speed=0.5, seconds=0.06, clock=ticking())
    assert done.int8_ops == pytest.approx(whole.int8_ops)   # times the speed, like measure
    assert done.model_copy(update={"int8_ops": 0.0}) == first


def test_int8_runs_on_the_threads_a_shard_gets(monkeypatch) -> None:
    import onnxruntime as ort

    made: list[int] = []
    real = ort.InferenceSession

    def spy(model, options=None, **kw):
        made.append(options.intra_op_num_threads)
        return real(model, options, **kw)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(ort, "InferenceSession", spy)
    profile.int8_ops(0.02)
    assert made == [1] == [profile.blas_threads()]
