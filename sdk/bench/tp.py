"""``edgeswarm bench tp``: tensor-parallel minilm and smollm2 on 1, 2 and 4 emulated devices.

Every device is a member process pinned to one core with one torch thread
(:mod:`edgeswarm.bench.tp_runner`); the 1-device baseline runs the same member program as
a group of one, on one core too. For each run of the matrix (:func:`matrix`):

- minilm: ``throughput`` in sequences/s of a batch of 8 x 128 tokens (``forward_ms``);
- smollm2: ``ttft_ms`` (128-token prompt to the first greedy token) and ``tpot_ms``
  (mean per later token, 64 new tokens); ``throughput`` = 1000 / tpot_ms tokens/s;
- ``max_abs_diff`` to the one-device zoo model (minilm: the encoder's hidden states;
  smollm2: the prompt's full logits and those of the first decode steps), ``tokens_match``;
- ``param_bytes_per_device`` (the largest member's shard) and ``peak_rss_bytes`` (the
  largest member's VmHWM), with ``base_rss_bytes`` (the interpreter and torch, before the
  shard opened) and ``resident_param_bytes`` (weights in memory at the peak's end);
- ``collective_ms``: mean milliseconds per all-reduce inside the run (prefill, decode),
  as member 0 saw it (the wait for the slowest member included).

Each run repeats its job (``repeats``, default 3) after a warm-up and keeps the best
repeat of the slowest member: this machine is shared, so timings are noisy. ``speedup``
divides the 1-device figure by the k-device one (no link, all-reduce "auto", no window;
smollm2: time to first token; ``speedup_tpot``: per-token latency). ``collectives`` times
all-reduces alone, each algorithm, decode- and prefill-sized, 2 and 4 processes, with
what the cost model predicted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeswarm.placement.errors import InvalidInput

if TYPE_CHECKING:  # torch and the models load when a measurement starts, not with the CLI
    import torch

    from edgeswarm.bench.tp_runner import DecodeJob, EncodeJob, GroupResult
    from edgeswarm.device_agent.dataplane import Shaping

log = logging.getLogger("edgeswarm.bench")

__all__ = ["MODELS", "Case", "matrix", "run"]

Progress = Callable[[str], None]

MODELS = ("minilm", "smollm2")
#: name -> (latency s, bandwidth B/s); "none": plain loopback.
LINKS: dict[str, tuple[float, float] | None] = {
    "none": None, "1gbit-1ms": (1e-3, 125e6), "100mbit-5ms": (5e-3, 12.5e6)}
#: Layers a member keeps resident with the sliding window on.
WINDOW = 2
#: On 2+ devices minilm's batch and smollm2's prompt go in this many pieces (one's
#: all-reduce under the other's work). 1: on this 2-core machine a member's one core does
#: the transport too, so pieces measured no faster (one run with 2 pieces shows it).
MICRO_BATCHES = 1
BATCH, SEQUENCE = 8, 128
PROMPT, NEW_TOKENS, CHECK_STEPS = 128, 64, 4
QUICK = {"batch": 2, "sequence": 32, "prompt": 16, "new_tokens": 4, "check_steps": 2}


@dataclass(frozen=True)
class Case:
    """One run of the matrix."""

    model: str
    devices: int
    link: str = "none"
    allreduce: str = "auto"
    window: int | None = None
    #: Pieces of minilm's batch / smollm2's prompt that take turns (None: MICRO_BATCHES
    #: on 2+ devices, 1 on one).
    micro_batches: int | None = None


def matrix(quick: bool = False, models: Sequence[str] = MODELS,
           window: int = WINDOW) -> list[Case]:
    """The runs: every device count without link emulation; at 2 devices both emulated
    links, the algorithms side by side (no link and 1 Gbit) and the window; at 4
    devices correctness and memory (one run, and the window). ``quick``: 1 and 2 devices,
    no link, for tests."""
    cases: list[Case] = []
    for m in models:
        if m not in MODELS:
            raise InvalidInput(f"bench tp measures {', '.join(MODELS)}; got {m!r}")
        if quick:
            cases += [Case(m, 1), Case(m, 2), Case(m, 2, window=window)]
            continue
        cases += [Case(m, 1), Case(m, 1, window=window)]
        cases += [Case(m, 2, link) for link in LINKS]
        cases += [Case(m, 2, link, a) for link in ("none", "1gbit-1ms")
                  for a in ("direct", "star", "gloo")]
        cases += [Case(m, 2, window=window), Case(m, 4), Case(m, 4, window=window)]
        cases.append(Case(m, 2, micro_batches=2))
    return cases


def run(quick: bool = False, repeats: int | None = None, models: Sequence[str] = MODELS,
        window: int = WINDOW, progress: Progress | None = None) -> dict[str, Any]:
    """Measure the matrix; returns the JSON document (see the module docstring)."""
    say = progress or (lambda _msg: None)
    repeats = repeats if repeats is not None else (1 if quick else 3)
    if repeats < 1:
        raise InvalidInput(f"repeats must be >= 1, got {repeats}")
    cases = matrix(quick, models, window)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeswarm-tp-") as tmp:
        for name in dict.fromkeys(c.model for c in cases):
            say(f"{name}: loading the model and its reference outputs")
            bench = _ModelBench(name, quick, Path(tmp) / name)
            for case in (c for c in cases if c.model == name):
                say(f"{name}: {case.devices} device(s), link {case.link}, "
                    f"{case.allreduce}, window {case.window or 'off'}")
                runs.append(bench.measure(case, repeats))
            del bench  # the model and its reference outputs: hundreds of MB
    say("all-reduces alone")
    doc: dict[str, Any] = {
        "runs": runs,
        "speedup": _speedup(runs, "time_s"),
        "speedup_tpot": _speedup(runs, "tpot_ms", only=("smollm2",)),
        "collectives": _collectives(quick),
        "repeats": repeats,
        "window_layers": window,
        "cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return doc


class _ModelBench:
    """One model: its reference outputs, its shards per group size (written once)."""

    def __init__(self, name: str, quick: bool, directory: Path) -> None:
        import torch

        from edgeswarm.bench.tp_runner import DecodeJob, EncodeJob

        self.name = name
        self.model: Any
        self.directory = directory
        self._shards: dict[int, list[Path]] = {}
        self._job: DecodeJob | EncodeJob
        sizes = QUICK if quick else {"batch": BATCH, "sequence": SEQUENCE, "prompt": PROMPT,
                                     "new_tokens": NEW_TOKENS, "check_steps": CHECK_STEPS}
        if name == "minilm":
            from edgeswarm.models.zoo import minilm

            module = minilm.load_module()
            self.kind, self.model = "bert", module.bert
            ids, mask = _minilm_batch(sizes["batch"], sizes["sequence"])
            with torch.inference_mode():
                self.reference: dict[str, torch.Tensor] = {"hidden": self.model(ids, mask)}
            self._job = EncodeJob(_rows(ids), _rows(mask))
        else:
            from edgeswarm.models.tp.llama import reference_generation
            from edgeswarm.models.zoo import smollm2

            lm = smollm2.load_lm()
            self.kind, self.model = "llama", lm.module
            prompt = _smollm2_prompt(lm, sizes["prompt"])
            logits, decoded, tokens = reference_generation(
                lm.module, prompt, sizes["new_tokens"], sizes["check_steps"])
            self.reference = {"prefill": logits, "tokens": tokens}
            if decoded:
                self.reference["decode"] = torch.stack(decoded)
            self._job = DecodeJob(_rows(prompt), sizes["new_tokens"], _rows(tokens),
                                  sizes["check_steps"])

    def shards(self, devices: int) -> list[Path]:
        from edgeswarm.bench.tp_runner import write_shards
        from edgeswarm.models.tp.bert import bert_shape
        from edgeswarm.models.tp.llama import llama_shape
        from edgeswarm.models.tp.split import split_layers

        if devices not in self._shards:
            shape = (llama_shape(self.model.config) if self.kind == "llama"
                     else bert_shape(self.model.config))
            split = split_layers(shape, [1.0] * devices)
            written = write_shards(self.kind, self.model, split,
                                   self.directory / f"{devices}-devices")
            self._shards[devices] = [path for path, _ in written]
        return self._shards[devices]

    def measure(self, case: Case, repeats: int) -> dict[str, Any]:
        from edgeswarm.bench.tp_runner import EncodeJob, GroupOptions, run_group

        options = GroupOptions(algorithm=case.allreduce, link=_link(case.link),
                               window=case.window, repeats=repeats)
        job = self._job
        pieces = case.micro_batches or (MICRO_BATCHES if case.devices > 1 else 1)
        if isinstance(job, EncodeJob):
            job = dataclasses.replace(job, micro_batches=pieces)
        else:
            job = dataclasses.replace(job, prefill_chunks=pieces)
        result = run_group(self.shards(case.devices), job, options)
        return self._row(case, result, job)

    def _row(self, case: Case, result: GroupResult, job: DecodeJob | EncodeJob
             ) -> dict[str, Any]:
        import numpy as np

        from edgeswarm.bench.tp_runner import EncodeJob

        members = result.members
        time_s = result.best_time_s()
        row: dict[str, Any] = {
            "model": case.model, "devices": case.devices, "link": case.link,
            "allreduce": case.allreduce if case.devices > 1 else "none",
            "window": case.window,
        }
        if isinstance(job, EncodeJob):
            row.update(throughput=round(len(job.input_ids) / time_s, 3),
                       forward_ms=round(1e3 * time_s, 2), ttft_ms=None, tpot_ms=None,
                       micro_batches=job.micro_batches)
            diff = float(np.abs(members[0].outputs["hidden"]
                                - self.reference["hidden"].numpy()).max())
            tokens_match = None
        else:
            tpot_s = result.best_step_s()
            row.update(throughput=round(1.0 / tpot_s, 3), ttft_ms=round(1e3 * time_s, 2),
                       tpot_ms=round(1e3 * tpot_s, 3), micro_batches=job.prefill_chunks)
            prefill = np.concatenate([m.outputs["prefill"] for m in members], axis=-1)
            diff = float(np.abs(prefill - self.reference["prefill"].numpy()).max())
            if "decode" in self.reference:
                decoded = np.concatenate([m.outputs["decode"] for m in members], axis=-1)
                diff = max(diff, float(np.abs(decoded
                                              - self.reference["decode"].numpy()).max()))
            tokens_match = members[0].tokens == self.reference["tokens"].tolist()
        prefill_ms, decode_ms = result.collective_ms()
        row.update(
            max_abs_diff=diff, tokens_match=tokens_match,
            param_bytes_per_device=max(m.param_bytes for m in members),
            peak_rss_bytes=max(m.peak_rss_bytes for m in members),
            base_rss_bytes=max(m.base_rss_bytes for m in members),
            resident_param_bytes=max(m.resident_param_bytes for m in members),
            collective_ms={"prefill": round(prefill_ms, 4), "decode": round(decode_ms, 4)},
            algorithms_used=members[0].algorithms,
            calibrated={"overhead_ms": {a: round(1e3 * v, 4) for a, v in
                                        members[0].overhead_s.items() if "_" not in a},
                        "ns_per_byte": {a.split("_")[0]: round(1e9 * v, 4) for a, v in
                                        members[0].overhead_s.items() if "_" in a}},
            time_s=time_s,
        )
        return row


def _link(name: str) -> Shaping | None:
    from edgeswarm.device_agent.dataplane import Shaping

    if name not in LINKS:
        raise InvalidInput(f"unknown link {name!r}: choose one of {', '.join(LINKS)}")
    spec = LINKS[name]
    return None if spec is None else Shaping(latency_s=spec[0], bandwidth_Bps=spec[1])


def _rows(t: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(v) for v in row) for row in t.tolist())


def _minilm_batch(batch: int, sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` rows of ``sequence`` real tokens: held-out sentences joined, cut, closed
    with [SEP]."""
    from edgeswarm.models.zoo import minilm

    heldout, _ = minilm.load_sentences()
    tokenizer = minilm.load_tokenizer()
    per_row = max(1, len(heldout) // batch)
    texts = [" ".join(heldout[(i * per_row + j) % len(heldout)] for j in range(per_row))
             for i in range(batch)]
    ids, mask = tokenizer(texts)
    if ids.shape[1] < sequence or int(mask[:, :sequence].min()) == 0:
        raise InvalidInput(f"the held-out sentences give fewer than {sequence} tokens a row")
    ids, mask = ids[:, :sequence].clone(), mask[:, :sequence].clone()
    ids[:, -1] = _sep_id(tokenizer)
    return ids, mask


def _sep_id(tokenizer: Any) -> int:
    ids, _ = tokenizer(["a"])
    return int(ids[0, -1])  # [CLS] a [SEP]


def _smollm2_prompt(lm: Any, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the zoo's held-out text."""
    import torch

    from edgeswarm.models.zoo import smollm2

    heldout, _ = smollm2.load_paragraphs()
    ids: list[int] = []
    for paragraph in heldout:
        ids += lm.encode(paragraph)
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise InvalidInput(f"the held-out text has {len(ids)} tokens, fewer than {length}")
    return torch.tensor([ids[:length]], dtype=torch.long)


def _speedup(runs: Sequence[dict[str, Any]], key: str,
             only: Sequence[str] = MODELS) -> dict[str, dict[str, float | None]]:
    """1-device figure over the k-device one, at no link, "auto", no window."""
    out: dict[str, dict[str, float | None]] = {}
    for model in only:
        base = _find(runs, model, 1)
        if base is None:
            continue
        out[model] = {}
        for k in (2, 4):
            other = _find(runs, model, k)
            if other is not None and base.get(key) and other.get(key):
                out[model][str(k)] = round(base[key] / other[key], 3)
            else:
                out[model][str(k)] = None
    return out


def _find(runs: Sequence[dict[str, Any]], model: str, devices: int) -> dict[str, Any] | None:
    for r in runs:
        if (r["model"], r["devices"], r["link"], r["window"]) == (model, devices, "none", None) \
                and r["allreduce"] in ("auto", "none"):
            return r
    return None


def _collectives(quick: bool) -> list[dict[str, Any]]:
    """All-reduces alone: decode-sized (1 x 576) and prefill-sized (128 x 576, minilm's
    8 x 128 x 384) float32, every algorithm, 2 and 4 processes, no link; with 0.3 ms of
    work between two (about one sub-block of decoding on one core)."""
    from edgeswarm.bench.tp_runner import CollectiveJob, GroupOptions, run_collectives
    from edgeswarm.models.tp.collective import predict_times

    shapes: tuple[tuple[int, ...], ...] = ((1, 576),) if quick else (
        (1, 576), (128, 576), (8, 128, 384))
    algorithms = ("direct", "star", "gloo", "star-framed")
    out = []
    for size in ((2,) if quick else (2, 4)):
        job = CollectiveJob(shapes, algorithms, rounds=20 if quick else 200,
                            compute_s=3e-4)
        result = run_collectives(size, job, GroupOptions(timeout_s=600.0))
        for shape in shapes:
            nbytes = 4 * math.prod(shape)
            predicted = predict_times(size, nbytes, None)
            for a in algorithms:
                key = f"{a} {'x'.join(map(str, shape))}"
                out.append({"devices": size, "link": "none", "allreduce": a,
                            "shape": list(shape), "bytes": nbytes,
                            "ms": round(max(m.allreduce_ms[key] for m in result.members), 4),
                            "predicted_ms": round(1e3 * predicted[a.removesuffix("-framed")],
                                                  4)})
    return out
