"""``edgeswarm bench runtimes``: every zoo model on every runtime, measured in one run.

For each model the executables are built first, then scored on held-out real data, then
timed with the runtimes interleaved round by round (batch 1 latency, batch 32
throughput), so that machine drift does not favour one of them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.bench.timing import interleaved, median
from edgeswarm.models import zoo
from edgeswarm.models.runtimes import RUNTIMES, Executable, compile
from edgeswarm.models.runtimes.onnx_runtime import default_threads
from edgeswarm.placement.errors import Error, InvalidInput

#: Runtimes measured by default: the spiking runtime has its own benchmark (bench snn).
DEFAULT_RUNTIMES = tuple(rt for rt in RUNTIMES if rt != "snn")

log = logging.getLogger("edgeswarm.bench")

SCORE_BATCH = 32
#: Why token-input transformers are not benchmarked on tflite-int8 (see docs/runtimes.md).
TFLITE_SKIP_REASON = (
    "not measured: litert-torch converts token-input transformers with a fixed sequence "
    "length and keeps embeddings, norms and softmax in float, so it is not full-integer; "
    "use onnx-int8")
THROUGHPUT_BATCH = 32


@dataclass
class Row:
    model: str
    runtime: str
    accuracy: float | None = None
    latency_ms_b1: float | None = None
    throughput_b32: float | None = None
    size_bytes: int | None = None
    error: str | None = None


Progress = Callable[[str], None]


def run(models: Sequence[str] | None = None, runtimes: Sequence[str] | None = None,
        rounds: int = 30, budget_s: float = 20.0, progress: Progress | None = None,
        workdir: Path | None = None) -> dict[str, Any]:
    """Measure and return ``{"results": [...], "models": {...}, "threads": N}``."""
    import torch

    threads = default_threads()
    torch.set_num_threads(threads)
    say = progress or (lambda _msg: None)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="edgeswarm-bench-") as tmp:
        base = workdir or Path(tmp)
        for name in models or zoo.names():
            rows += _bench_model(name, list(runtimes or DEFAULT_RUNTIMES), rounds, budget_s, say,
                                 base / name)
    return {"results": [asdict(r) for r in rows], "models": _summaries(rows),
            "threads": threads}


def _bench_model(name: str, runtimes: list[str], rounds: int, budget_s: float, say: Progress,
                 workdir: Path) -> list[Row]:
    say(f"{name}: loading")
    model = zoo.load(name)
    exes: dict[str, Executable] = {}
    rows = {rt: Row(name, rt) for rt in runtimes}
    token_inputs = any(not x.is_floating_point() for x in model.example_inputs)
    for rt in runtimes:
        if rt == "tflite-int8" and token_inputs:
            rows[rt].error = TFLITE_SKIP_REASON
            continue
        say(f"{name}: compiling for {rt}")
        try:
            suffix = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "tflite-int8": ".int8.tflite"}
            exes[rt] = compile(name, rt, output=workdir / f"{name}{suffix.get(rt, '')}")
            rows[rt].size_bytes = exes[rt].size_bytes
        except Error as exc:
            rows[rt].error = str(exc)
            log.warning("%s on %s: %s", name, rt, exc)
    reference = _torch_outputs(model)
    for rt, exe in exes.items():
        say(f"{name}: scoring {rt} on {len(model.heldout)} held-out samples")
        try:
            rows[rt].accuracy = score(model, heldout_outputs(exe, model), reference)
        except Error as exc:
            rows[rt].error = str(exc)
    live = {rt: exe for rt, exe in exes.items() if rows[rt].error is None}
    say(f"{name}: timing {', '.join(live)} interleaved")
    one = [np.ascontiguousarray(x.numpy()) for x in model.example_inputs]
    batch = [np.ascontiguousarray(x.numpy()) for x in model.batch(THROUGHPUT_BATCH)]
    for exe in live.values():  # warm up: first calls allocate
        exe.run(one)
        exe.run(batch)
    lat = interleaved([_call(e, one) for e in live.values()], rounds, budget_s / 2)
    thr = interleaved([_call(e, batch) for e in live.values()], max(3, rounds // 4),
                      budget_s / 2)
    for (rt, _), l_s, t_s in zip(live.items(), lat, thr, strict=True):
        rows[rt].latency_ms_b1 = round(median(l_s) * 1e3, 4)
        rows[rt].throughput_b32 = round(THROUGHPUT_BATCH / median(t_s), 2)
    return list(rows.values())


def _call(exe: Executable, inputs: list[np.ndarray]) -> Callable[[], object]:
    return lambda: exe.run(inputs)


def heldout_outputs(exe: Executable, model: zoo.ZooModel) -> np.ndarray:
    parts = []
    for start in range(0, len(model.heldout), SCORE_BATCH):
        xs = [x.numpy() for x in model.heldout.batch(start, SCORE_BATCH)]
        parts.append(exe.run(xs)[0])
    return np.concatenate(parts)


def _torch_outputs(model: zoo.ZooModel) -> np.ndarray:
    import torch

    parts = []
    with torch.inference_mode():
        for start in range(0, len(model.heldout), SCORE_BATCH):
            out = model.module(*model.heldout.batch(start, SCORE_BATCH))
            parts.append((out[0] if isinstance(out, (tuple, list)) else out).numpy())
    return np.concatenate(parts)


def score(model: zoo.ZooModel, out: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Held-out score by the model's metric; cosine and agreement compare to ``reference``."""
    if model.metric == "accuracy":
        assert model.heldout.labels is not None, "accuracy needs labels"
        return float((out.argmax(-1) == model.heldout.labels.numpy()).mean())
    if reference is None:
        raise InvalidInput(f"scoring {model.name} by {model.metric} needs fp32 reference outputs")
    if model.metric == "cosine":
        a = out.reshape(len(out), -1)
        b = reference.reshape(len(reference), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        return float(cos.mean())
    return float((out.argmax(-1) == reference.argmax(-1)).mean())


def _summaries(rows: list[Row]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for name in dict.fromkeys(r.model for r in rows):
        by_rt = {r.runtime: r for r in rows if r.model == name}
        fp32, int8 = by_rt.get("onnx"), by_rt.get("onnx-int8")
        speedup = drop = None
        if fp32 and int8 and fp32.throughput_b32 and int8.throughput_b32:
            speedup = round(int8.throughput_b32 / fp32.throughput_b32, 3)
        if fp32 and int8 and fp32.accuracy is not None and int8.accuracy is not None:
            drop = round(fp32.accuracy - int8.accuracy, 5)
        out[name] = {"int8_speedup": speedup, "int8_accuracy_drop": drop}
    return out
