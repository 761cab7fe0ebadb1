"""The device profile: what this device can do, measured when the agent starts.

``measure`` times square matrix multiplies, :data:`STEPS` of them or a fraction of a second,
whichever ends first (the rate of the median multiply, so that passing load on the machine
does not lower it), and reads the rest from the system:

- ``flops``: fp32 matmul throughput through numpy's BLAS (torch is not imported: it takes
  seconds to load on a small board, and the agent announces itself after this);
- ``int8_ops``: int8 x int8 -> int32 matmul throughput with ONNX Runtime's
  ``MatMulInteger`` (what int8 shards run on; needs ``onnx`` to build the one-node
  model), on the threads a shard gets (:func:`blas_threads`); where that fails,
  ``torch._int_mm``; 0.0 when neither is available, or not measured yet (the agent
  measures it just after it announces itself: :func:`with_int8`);
- ``memory_bytes``: memory available now (``psutil.virtual_memory().available``);
- ``runtimes``: the shard runtimes whose packages are importable (``torch``; ``onnx`` and
  ``onnx-int8`` through onnxruntime; ``tflite-int8`` through ai_edge_litert;
  ``safetensors`` weights for registered builders; ``snn`` spiking networks, with torch);
- ``cores``: CPUs this process may run on; ``platform``: OS, release and machine.

``speed`` (the testbed's ``--speed``) multiplies both throughputs, so an emulated slow device
reports what it will deliver.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
import psutil

from edgeswarm.device_agent.protocol import DeviceProfile
from edgeswarm.device_agent.topics import check_name
from edgeswarm.placement.errors import InvalidInput

log = logging.getLogger("edgeswarm.agent.profile")

MATMUL_N = 256          # square matrices: 2 * n**3 operations per multiply
MAX_REPEATS = 100_000   # every timing loop is bounded by count as well as time
#: Timed multiplies per throughput: the median of 50 is within 1% of the median of
#: thousands (measured here, on a loaded machine too), and 50 cost 17 ms of fp32 and
#: ~60 ms of int8 on this laptop's core where the old 0.15 s budgets cost 0.3 CPU-s in
#: all. Every agent of a testbed pays this at start, N of them on a few cores; a slow
#: board reaches ``seconds`` first.
STEPS = 50

Clock = Callable[[], float]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def installed_runtimes(prefer: Sequence[str] = ()) -> list[str]:
    """The shard runtimes this device can run, by which packages are importable.

    ``snn`` (spiking networks) runs on torch and safetensors. ``prefer``: runtimes this
    device declares it is built for (``snn`` on spiking hardware), listed first, in that
    order: the list is the device's order of preference, which placement reads
    (:mod:`edgeswarm.models.spiking.placement`). Preferring a runtime that is not
    installed is an :class:`InvalidInput`.
    """
    runtimes: list[str] = []
    if _has("torch"):
        runtimes.append("torch")
    if _has("onnxruntime"):
        runtimes += ["onnx", "onnx-int8"]
    if _has("ai_edge_litert"):
        runtimes.append("tflite-int8")
    if _has("safetensors"):
        runtimes.append("safetensors")
        if _has("torch"):
            runtimes.append("snn")
    missing = [r for r in prefer if r not in runtimes]
    if missing:
        raise InvalidInput(f"preferred runtime(s) {', '.join(missing)} not installed here "
                           f"(installed: {', '.join(runtimes) or 'none'})")
    return list(dict.fromkeys([*prefer, *runtimes]))


def _ops_per_second(step: Callable[[], object], ops: float, seconds: float,
                    clock: Clock, steps: int = MAX_REPEATS) -> float:
    """Run ``step`` (one warm-up, then ``steps`` times or until ``seconds`` pass) and
    return ``ops`` per second of the median step.

    The median, not the mean: a step is far shorter than a scheduler time slice, so on a
    busy machine most steps run undisturbed and a few are stretched by preemption (other
    processes starting, such as the other agents of a testbed spawned together). The mean
    mixes in that passing load (measured here: 11 GFLOP/s for four agents starting on two
    cores, against 104 GFLOP/s for the median step, alone or not); the median is the rate
    at which the device computes while it has the CPU, which is what a shard gets.
    """
    step()
    start = prev = clock()
    times: list[float] = []
    while len(times) < min(steps, MAX_REPEATS):
        step()
        now = clock()
        times.append(now - prev)
        prev = now
        if now - start >= seconds:
            break
    return ops / max(float(np.median(times)), 1e-12)


def fp32_flops(seconds: float, clock: Clock = time.perf_counter, steps: int = STEPS) -> float:
    """fp32 matmul FLOP/s through numpy's BLAS (all the threads it uses). numpy, not
    torch: importing torch costs seconds on a small board, and an agent announces itself
    only after its profile is measured."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    return _ops_per_second(lambda: a @ b, 2.0 * MATMUL_N**3, seconds, clock, steps)


def _int8_operands() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (MATMUL_N, MATMUL_N), dtype=np.int8)
    b = rng.integers(-128, 128, (MATMUL_N, MATMUL_N), dtype=np.int8)
    return a, b


def _int8_torch(seconds: float, clock: Clock, steps: int = STEPS) -> float:
    import torch

    a, b = (torch.from_numpy(x) for x in _int8_operands())
    with torch.inference_mode():
        return _ops_per_second(lambda: torch._int_mm(a, b), 2.0 * MATMUL_N**3, seconds, clock,
                               steps)


def _int8_onnxruntime(seconds: float, clock: Clock, steps: int = STEPS) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = MATMUL_N
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    # the threads a shard runs on (the agent gives its executor blas_threads()); ONNX
    # Runtime's default, every core, would measure a rate no shard gets
    options = ort.SessionOptions()
    options.intra_op_num_threads = blas_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    a, b = _int8_operands()
    return _ops_per_second(lambda: session.run(None, {"a": a, "b": b}), 2.0 * n**3,
                           seconds, clock, steps)


def int8_ops(seconds: float, clock: Clock = time.perf_counter,
             steps: int = STEPS) -> tuple[float, str]:
    """int8 matmul ops/s and the engine that measured it ("onnxruntime", "torch" or
    "none"). ONNX Runtime's MatMulInteger first: it is what int8 shards run on, and it
    loads in a fraction of torch's import time."""
    if _has("onnxruntime") and _has("onnx"):
        try:
            return _int8_onnxruntime(seconds, clock, steps), "onnxruntime"
        except Exception as exc:  # any ORT failure only means "not measured"
            log.debug("onnxruntime MatMulInteger failed: %s; trying torch", exc)
    if _has("torch"):
        try:
            return _int8_torch(seconds, clock, steps), "torch"
        except (RuntimeError, AttributeError, NotImplementedError) as exc:
            log.debug("torch._int_mm does not run here (%s)", exc)
    log.warning("int8 throughput not measured: neither onnxruntime nor torch._int_mm works")
    return 0.0, "none"


def blas_threads() -> int:
    """Threads the fp32 profile was measured with, and so the threads a shard should run on:
    ``OMP_NUM_THREADS`` (or ``OPENBLAS_NUM_THREADS``) when set, as the testbed sets it for
    each agent, else every core (numpy's BLAS default)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return cores()


def cores() -> int:
    """CPUs this process may run on (its affinity mask, so containers report their share)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def measure(device_id: str, speed: float = 1.0, seconds: float = 0.3,
            clock: Clock = time.perf_counter, steps: int = STEPS,
            measure_int8: bool = True, prefer: Sequence[str] = ()) -> DeviceProfile:
    """Measure this device; ``seconds`` is the time budget of the two matmul timings together,
    ``steps`` the most multiplies each of them times. Without ``measure_int8``, ``int8_ops``
    is 0.0 (not measured yet: see :func:`with_int8`). ``prefer``: the runtimes this device
    is built for, first in its list (see :func:`installed_runtimes`)."""
    check_name(device_id, "device name")
    runtimes = installed_runtimes(prefer)  # before timing: an unknown preference fails fast
    if not speed > 0:
        raise InvalidInput(f"speed {speed} must be > 0 (1.0 = this device's real speed)")
    if not seconds > 0:
        raise InvalidInput(f"seconds {seconds} must be > 0")
    if steps < 1:
        raise InvalidInput(f"steps {steps} must be >= 1")
    flops = fp32_flops(seconds / 2, clock, steps)
    int8, engine = int8_ops(seconds / 2, clock, steps) if measure_int8 else (0.0, "later")
    log.info("profile of %s: fp32 %.2f GFLOP/s, int8 %.2f GOP/s (%s), speed x%g",
             device_id, flops / 1e9, int8 / 1e9, engine, speed)
    return DeviceProfile(
        id=device_id,
        flops=float(flops * speed),
        int8_ops=float(int8 * speed),
        memory_bytes=int(psutil.virtual_memory().available),
        runtimes=runtimes,
        cores=cores(),
        speed=float(speed),
        platform=platform.platform(),
    )


def with_int8(measured: DeviceProfile, seconds: float = 0.15, clock: Clock = time.perf_counter,
              steps: int = STEPS) -> DeviceProfile:
    """``measured`` with its int8 throughput measured now (times its ``speed``).

    The agent announces itself with the rest of the profile, which the planner needs, and
    measures this right after: importing ONNX Runtime and timing the int8 multiplies were
    ~40% of an agent's start-up CPU before it announced itself (no plan uses int8_ops yet;
    a coordinator sees it in the agent's next state)."""
    if not seconds > 0:
        raise InvalidInput(f"seconds {seconds} must be > 0")
    ops, engine = int8_ops(seconds, clock, steps)
    log.info("profile of %s: int8 %.2f GOP/s (%s), speed x%g", measured.id, ops / 1e9, engine,
             measured.speed)
    return measured.model_copy(update={"int8_ops": float(ops * measured.speed)})
