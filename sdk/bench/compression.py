"""``edgeswarm bench compression``: the rate–accuracy curve of every codec on scene-cnn.

On the held-out real scenes, measured in one run:

- **feature codecs** on the activation at the cut after ``split`` (``conv1``: 32x16x16
  fp32, 32 KiB a sample): ``none`` (raw fp32), ``fp16``, ``int8`` (+ zstd) with the
  teacher's tail, and the ``learned`` codec at every β with its fine-tuned tail;
- **input codecs**: the image itself as PNG, JPEG and WebP at several qualities, then
  the whole unsplit teacher;
- **end to end** (key ``e2e``, :mod:`edgeswarm.bench.compression_e2e`): the model split at
  the same cut over two agent processes of the testbed on a 10 Mbit/s, 20 ms link, p50
  latency with each codec against none (``e2e_requests=None`` skips it: ``"e2e": null``).

Every sample is encoded and decoded on its own (one request, one message), so
``bytes_per_sample`` is the size of a one-sample message, header included; ``encode_ms``
and ``decode_ms`` are medians over the timed samples, on one torch thread. Learned codecs
are trained on first use and cached (training is not measured here); every figure printed
is measured in the run that prints it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeswarm.placement.errors import InvalidInput

if TYPE_CHECKING:
    from edgeswarm.models.codecs import Codec, Measurement

SPLIT = "conv1"
FEATURE_CODECS = ("none", "fp16", "int8")
JPEG_QUALITIES = (95, 90, 75, 50, 25)
WEBP_QUALITIES = (95, 90, 75, 50, 25)
#: Samples timed per codec (all held-out samples are coded and scored).
TIMED = 200
#: torch threads while codecs run: one message is a few small convolutions, which a
#: thread pool only slows down (on a loaded two-core machine, by 100x: 25 ms instead of
#: 0.3 ms when a pool thread is descheduled).
CODEC_THREADS = 1
#: "Near the teacher": at most this much below its accuracy (one point).
TOLERANCE = 0.01
_BATCH = 250

Progress = Callable[[str], None]
Clock = Callable[[], float]


def run(betas: Sequence[float] | None = None, samples: int | None = None,
        timed: int = TIMED, split: str = SPLIT, progress: Progress | None = None,
        clock: Clock = time.perf_counter, e2e_requests: int | None = None) -> dict[str, Any]:
    """Measure every codec; returns ``{"points": [...], "teacher_accuracy": a, "e2e": ...}``
    (``e2e``: the end-to-end run with ``e2e_requests`` requests per codec, None when
    ``e2e_requests`` is None)."""
    import torch

    from edgeswarm.models import codecs, zoo
    from edgeswarm.models.codecs.e2e import split_with_codec
    from edgeswarm.models.codecs.train import BETAS, LearnedRecipe, load_or_train, recipes_for

    if samples is not None and samples < 1:
        raise InvalidInput(f"--samples must be at least 1, got {samples}")
    if e2e_requests is not None and e2e_requests < 1:
        raise InvalidInput(f"--e2e-requests must be at least 1, got {e2e_requests}")
    if e2e_requests is not None and split != SPLIT:
        raise InvalidInput(f"the end-to-end run cuts after {SPLIT!r}; skip it for another cut")
    say = progress or (lambda _msg: None)
    say("loading scene-cnn")
    model = zoo.load("scene-cnn")
    n = len(model.heldout) if samples is None else samples
    if n > len(model.heldout):
        raise InvalidInput(f"--samples must be at most {len(model.heldout)}, got {n}")
    inputs = model.heldout.inputs[0][:n]
    labels = model.heldout.labels
    assert labels is not None  # scene-cnn is scored by accuracy
    labels_np = labels[:n].numpy()
    teacher = accuracy(lambda x: model.module(x), inputs.numpy(), labels_np)
    learned = load_or_train(recipes_for(betas or BETAS, LearnedRecipe(split=split)), model,
                            progress=say)
    points: list[dict[str, Any]] = []
    head = split_with_codec(model.module, model.example_inputs, split, codecs.get("none"))
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(CODEC_THREADS)
    try:
        with torch.inference_mode():
            features = np.concatenate([head.head(inputs[s:s + _BATCH])[0].numpy()
                                       for s in range(0, n, _BATCH)])
        for codec in [*(codecs.get(name) for name in FEATURE_CODECS), *learned]:
            say(f"feature codec {codec.full_name}")
            cs = split_with_codec(model.module, model.example_inputs, split, codec)
            points.append(feature_point(codec, features, cs.tail, labels_np, clock, timed))
        images = inputs.numpy()
        input_codecs = [codecs.get("png"), *(codecs.get(f"jpeg:{q}") for q in JPEG_QUALITIES),
                        *(codecs.get(f"webp:{q}") for q in WEBP_QUALITIES)]
        for codec in input_codecs:
            say(f"input codec {codec.full_name}")
            m = codecs.measure(codec, images, clock, timed)
            points.append(_point(codec, m, accuracy(lambda x: model.module(x), m.decoded,
                                                    labels_np)))
    finally:
        torch.set_num_threads(saved_threads)
    e2e = None
    if e2e_requests is not None:
        from edgeswarm.bench import compression_e2e

        e2e = compression_e2e.run(e2e_requests, progress=say)
    return {"points": points, "teacher_accuracy": teacher, "e2e": e2e}


def feature_point(codec: Codec, features: np.ndarray, tail: Any, labels: np.ndarray,
                  clock: Clock = time.perf_counter, timed: int | None = None) -> dict[str, Any]:
    """One feature codec: every sample of ``features`` (the activations at the cut)
    through the codec on its own, then ``tail`` (a stage module) on the decoded batch."""
    from edgeswarm.models import codecs

    m = codecs.measure(codec, features, clock, timed)
    return _point(codec, m, accuracy(lambda x: tail(x)[0], m.decoded, labels))


def accuracy(logits_of: Callable[[Any], Any], inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits_of`` (a torch function of a batch) on ``inputs``."""
    import torch

    correct = 0
    with torch.inference_mode():
        for s in range(0, len(labels), _BATCH):
            logits = logits_of(torch.from_numpy(inputs[s:s + _BATCH]))
            correct += int((logits.argmax(1).numpy() == labels[s:s + _BATCH]).sum())
    return correct / len(labels)


def _point(codec: Codec, m: Measurement, score: float) -> dict[str, Any]:
    return {"codec": codec.name, "setting": codec.setting,
            "bytes_per_sample": round(m.bytes_per_sample, 2), "accuracy": score,
            "encode_ms": round(m.encode_s * 1e3, 4), "decode_ms": round(m.decode_s * 1e3, 4)}


INPUT_CODECS = ("png", "jpeg", "webp")


def summary(doc: dict[str, Any], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The issue's targets read off a result.

    ``learned`` is the smallest learned point within ``tolerance`` of the teacher or, when
    none is, the most accurate learned point (``within_tolerance`` says which); then its
    reduction against raw fp32 features and the smallest input-codec point at least as
    accurate as it.
    """
    points, teacher = doc["points"], doc["teacher_accuracy"]
    fp32 = next((p for p in points if p["codec"] == "none"), None)
    learned = [p for p in points if p["codec"] == "learned"]
    near = [p for p in learned if p["accuracy"] >= teacher - tolerance - 1e-9]
    best = (min(near, key=lambda p: p["bytes_per_sample"]) if near
            else max(learned, key=lambda p: (p["accuracy"], -p["bytes_per_sample"]),
                     default=None))
    out: dict[str, Any] = {"teacher_accuracy": teacher, "tolerance": tolerance,
                           "fp32_bytes": fp32["bytes_per_sample"] if fp32 else None,
                           "learned": best, "within_tolerance": bool(near),
                           "points_below_teacher": None, "reduction_vs_fp32": None,
                           "input_codec": None, "fewer_bytes_than_input_codec": None}
    if best is None:
        return out
    out["points_below_teacher"] = round((teacher - best["accuracy"]) * 100, 2)
    if fp32:
        out["reduction_vs_fp32"] = round(fp32["bytes_per_sample"] / best["bytes_per_sample"], 2)
    rivals = [p for p in points if p["codec"] in INPUT_CODECS
              and p["accuracy"] >= best["accuracy"] - 1e-9]
    if rivals:
        rival = min(rivals, key=lambda p: p["bytes_per_sample"])
        out["input_codec"] = rival
        out["fewer_bytes_than_input_codec"] = best["bytes_per_sample"] < rival["bytes_per_sample"]
    return out


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Write the rate–accuracy curve (bytes per sample, log scale, against accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    families: dict[str, list[dict[str, Any]]] = {}
    for p in doc["points"]:
        families.setdefault(p["codec"], []).append(p)
    markers = {"none": "s", "fp16": "s", "int8": "s", "learned": "o", "png": "^",
               "jpeg": "v", "webp": "D"}
    for name, pts in families.items():
        pts = sorted(pts, key=lambda p: p["bytes_per_sample"])
        kind = "input" if name in INPUT_CODECS else f"features after {SPLIT}"
        ax.plot([p["bytes_per_sample"] for p in pts], [p["accuracy"] for p in pts],
                marker=markers.get(name, "o"), label=f"{name} ({kind})")
    teacher = doc["teacher_accuracy"]
    ax.axhline(teacher, color="grey", linestyle="--", linewidth=1, label="teacher (unsplit)")
    ax.axhline(teacher - TOLERANCE, color="grey", linestyle=":", linewidth=1,
               label="teacher − 1 point")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per sample on the wire (log scale)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("scene-cnn: rate–accuracy of feature and input codecs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
