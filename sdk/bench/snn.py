"""``edgeswarm bench snn``: spiking conversions of the ReLU zoo models, measured in one run.

Per model, on its whole held-out set:

- ``ann_accuracy`` and ``ann_macs`` (multiply-accumulates per inference) of the ANN as
  trained (the zoo model): the reference every target is measured against;
- ``converted_from``: ``trained`` when the SNN is converted from that ANN, else the
  fine-tuning it is converted from (:mod:`edgeswarm.models.spiking.tuned`: scene-cnn's
  QCFS and through-time stages), whose own accuracy as an ANN is
  ``converted_ann_accuracy``;
- ``by_T``: the converted SNN after T in {1, 2, 4, 8, 16, 32} steps: accuracy, mean
  synaptic operations (``sops``: spike-driven additions) per inference and batch-1
  latency (``latency_ms`` in the executor's ``auto`` mode, ``event_latency_ms`` forcing
  the event-driven path). A network's first T steps do not depend on how many follow, so
  one 32-step run gives every T's accuracy and SOPs; latencies are timed per T;
- ``timesteps``: the fewest T within ``tolerance`` (1 point) of the ANN's accuracy;
- ``dynamic``: early exit by output confidence with at most ``timesteps`` steps, the
  threshold (and the earliest step an input may stop at) calibrated for ``max_loss``
  (0.5 point) further loss. Calibrating and scoring
  on the same inputs would flatter it, so it is cross-fitted: the held-out set is split
  in five folds (a seeded permutation), each scored with the threshold calibrated on the
  other four.

Latencies are interleaved medians, side by side with the ANN's (``ann_latency_ms``, the
torch module at batch 1). The first layer's multiply-adds on the analog input, done once
per inference, are reported apart as ``input_macs``.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from edgeswarm.bench.timing import interleaved, median
from edgeswarm.placement.errors import InvalidInput

if TYPE_CHECKING:  # torch and the models load when a measurement starts, not with the CLI
    import torch

    from edgeswarm.models.spiking import ExitRule, Mode, SpikingNetwork

log = logging.getLogger("edgeswarm.bench")

#: The ReLU classifiers of the zoo, which convert.
MODELS = ("digits-mlp", "digits-cnn", "scene-cnn")
#: Cross-fitting of the early exit: folds of the held-out set, split by a seeded permutation.
FOLDS = 5
SPLIT_SEED = 0
#: Different held-out inputs the latency timings cycle through.
TIMING_INPUTS = 16

Progress = Callable[[str], None]


def run(models: Sequence[str] | None = None, rounds: int = 10, budget_s: float = 20.0,
        max_loss: float | None = None, tolerance: float | None = None,
        progress: Progress | None = None) -> dict[str, Any]:
    """Measure and return ``{"models": {name: {...}}, "threads": N, ...}``.

    ``max_loss`` and ``tolerance`` default to the ``snn`` runtime's (0.5 and 1 point).
    """
    import torch

    from edgeswarm.models.runtimes.onnx_runtime import default_threads
    from edgeswarm.models.spiking.runtime import MAX_LOSS, TIMESTEP_GRID, TOLERANCE

    max_loss = MAX_LOSS if max_loss is None else max_loss
    tolerance = TOLERANCE if tolerance is None else tolerance
    grid = TIMESTEP_GRID

    threads = default_threads()
    torch.set_num_threads(threads)
    say = progress or (lambda _msg: None)
    for name in models or ():
        if name not in MODELS:
            raise InvalidInput(f"bench snn measures the ReLU models {', '.join(MODELS)}; "
                               f"got {name!r}")
    result = {name: _bench_model(name, grid, rounds, budget_s, max_loss, tolerance, say)
              for name in models or MODELS}
    return {"models": result, "threads": threads, "grid": list(grid),
            "max_loss": max_loss, "tolerance": tolerance}


def _bench_model(name: str, grid: tuple[int, ...], rounds: int, budget_s: float,
                 max_loss: float, tolerance: float, say: Progress) -> dict[str, Any]:
    import torch

    from edgeswarm.models import zoo
    from edgeswarm.models.spiking import convert, simulate_batched
    from edgeswarm.models.spiking.tuned import RECIPES, for_conversion

    say(f"{name}: loading" + (", fine-tuning for few steps (first use only)"
                              if name in RECIPES else "") + " and converting")
    model = zoo.load(name)
    assert model.heldout.labels is not None, "the ReLU zoo models are labelled"
    x, labels = model.heldout.inputs[0], model.heldout.labels
    source = for_conversion(model)
    net = convert(source, model.calibration[0])
    with torch.inference_mode():
        ann_accuracy = float((model.module(x).argmax(-1) == labels).double().mean())
        source_accuracy = float((source(x).argmax(-1) == labels).double().mean())
    longest = grid[-1]
    say(f"{name}: {longest} steps on {len(x)} held-out inputs")
    full = simulate_batched(net, x, longest)
    correct = full.logits.argmax(-1) == labels  # (T, N)
    accuracy = correct.double().mean(1)
    cumulative = full.sops.cumsum(0)  # SOPs after each step, per input
    chosen = next((t for t in grid if accuracy[t - 1] >= ann_accuracy - tolerance), longest)
    dynamic = _dynamic(full.logits[:chosen], labels, cumulative[:chosen], max_loss)
    say(f"{name}: timing batch 1, interleaved")
    latency, event_latency, dynamic_ms, ann_ms = _latencies(
        net, model.module, x, grid, chosen, dynamic["threshold"], dynamic["min_steps"],
        rounds, budget_s)
    dynamic["latency_ms"] = dynamic_ms
    by_t = [{"T": t, "accuracy": round(float(accuracy[t - 1]), 5),
             "sops": round(float(cumulative[t - 1].mean()), 1),
             "latency_ms": latency[t], "event_latency_ms": event_latency[t]}
            for t in grid]
    recipe = RECIPES.get(name)
    return {"ann_accuracy": round(ann_accuracy, 5), "ann_macs": net.ann_macs(),
            "converted_from": "trained" if recipe is None else
            f"qcfs-L{recipe.qcfs.levels}+through-time-T{recipe.through_time.steps}",
            "converted_ann_accuracy": round(source_accuracy, 5),
            "input_macs": net.input_macs(), "ann_latency_ms": ann_ms, "heldout": len(x),
            "timesteps": chosen, "by_T": by_t, "dynamic": dynamic}


def _dynamic(logits: torch.Tensor, labels: torch.Tensor, cumulative: torch.Tensor,
             max_loss: float) -> dict[str, Any]:
    """Early exit, each fold of the inputs scored with the threshold of the other folds."""
    import torch

    from edgeswarm.models.spiking import calibrate, exit_predictions

    n = labels.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    pred = torch.empty(n, dtype=torch.int64)
    steps = torch.empty(n, dtype=torch.int64)
    thresholds, firsts = [], []
    for score in order.chunk(FOLDS):
        fit = order[~torch.isin(order, score)]
        cal = calibrate(logits[:, fit], max_loss)
        thresholds.append(round(cal.threshold, 6))
        firsts.append(cal.min_steps)
        pred[score], steps[score] = exit_predictions(logits[:, score], cal.threshold,
                                                     cal.min_steps)
    whole = calibrate(logits, max_loss, labels)  # what a compiled artifact would carry
    return {"accuracy": round(float((pred == labels).double().mean()), 5),
            "mean_T": round(float(steps.double().mean()), 3),
            "sops": round(float(cumulative[steps - 1, torch.arange(n)].mean()), 1),
            "T_max": int(logits.shape[0]),
            "full_accuracy": round(float((logits[-1].argmax(-1) == labels).double().mean()), 5),
            "threshold": whole.threshold, "min_steps": whole.min_steps,
            "fold_thresholds": thresholds, "fold_min_steps": firsts}


def _latencies(net: SpikingNetwork, module: torch.nn.Module, x: torch.Tensor,
               grid: tuple[int, ...], chosen: int, threshold: float, min_steps: int,
               rounds: int,
               budget_s: float,
               ) -> tuple[dict[int, float], dict[int, float], float, float]:
    """Batch-1 medians in ms: auto and event mode per T, dynamic exit, and the ANN."""
    import torch

    from edgeswarm.models.spiking import confidence, simulate

    inputs = [x[i:i + 1] for i in range(min(TIMING_INPUTS, len(x)))]

    def cycling(call: Callable[[torch.Tensor], object]) -> Callable[[], object]:
        it = itertools.cycle(inputs)
        return lambda: call(next(it))

    def spiking(t: int, mode: Mode, rule: ExitRule | None = None) -> Callable[[], object]:
        return cycling(lambda one: simulate(net, one, t, mode, rule))

    def ann(one: torch.Tensor) -> object:
        with torch.inference_mode():
            return module(one)

    def stop(logits: torch.Tensor, step: int) -> torch.Tensor:
        return (confidence(logits) >= threshold) & (step >= min_steps)

    calls = [spiking(t, "auto") for t in grid]
    calls += [spiking(t, "event") for t in grid]
    calls += [spiking(chosen, "auto", stop), cycling(ann)]
    for call in calls:  # warm up: first calls allocate
        call()
    samples = interleaved(calls, rounds, budget_s)
    ms = [round(median(s) * 1e3, 4) for s in samples]
    k = len(grid)
    return (dict(zip(grid, ms[:k], strict=True)),
            dict(zip(grid, ms[k:2 * k], strict=True)), ms[-2], ms[-1])


# --- the command ----------------------------------------------------------------------


def bench_snn_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        models: list[str] = typer.Option(None, "--model", "-m",
                                         help="Only these models (repeatable): "
                                              "digits-mlp, digits-cnn, scene-cnn."),
        rounds: int = typer.Option(10, help="Latency rounds per model (at most)."),
        budget: float = typer.Option(20.0, help="Latency seconds per model (at most)."),
) -> None:
    """Spiking conversions of the ReLU models: accuracy, timesteps, SOPs, latency."""
    err = Console(stderr=True)
    with err.status("benchmarking") as status:
        result = run(models or None, rounds=rounds, budget_s=budget,
                     progress=lambda msg: status.update(msg))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    out = Console()
    for name, r in result["models"].items():
        macs = r["ann_macs"]
        table = Table("run", "steps", "accuracy", "SOPs", "SOPs / MACs", "latency b1 (ms)",
                      "event-driven (ms)",
                      title=f"{name}: ANN {macs:,} MACs per inference; the SNN's first layer "
                            f"does {r['input_macs']:,} of them once",
                      caption=f"{r['heldout']} held-out inputs, {result['threads']} threads")
        table.add_row("ANN", "-", f"{r['ann_accuracy']:.4f}", "-", "-",
                      f"{r['ann_latency_ms']:.3f}", "-")
        if r["converted_from"] != "trained":
            table.add_row(f"ANN {r['converted_from']}", "-",
                          f"{r['converted_ann_accuracy']:.4f}", "-", "-", "-", "-")
        for row in r["by_T"]:
            mark = " *" if row["T"] == r["timesteps"] else ""
            table.add_row(f"SNN{mark}", str(row["T"]), f"{row['accuracy']:.4f}",
                          f"{row['sops']:,.0f}", f"{row['sops'] / macs:.3f}",
                          f"{row['latency_ms']:.3f}", f"{row['event_latency_ms']:.3f}")
        d = r["dynamic"]
        table.add_row("SNN dynamic", f"{d['mean_T']:.2f} of {d['T_max']}",
                      f"{d['accuracy']:.4f}", f"{d['sops']:,.0f}", f"{d['sops'] / macs:.3f}",
                      f"{d['latency_ms']:.3f}", "-")
        out.print(table)
        cut = 1 - d["mean_T"] / d["T_max"]
        out.print(f"  * fewest steps within {result['tolerance'] * 100:g} point of the ANN; "
                  f"dynamic confidence: {cut:.0%} fewer steps, "
                  f"{(d['full_accuracy'] - d['accuracy']) * 100:+.2f} points further loss "
                  f"(calibrated for {result['max_loss'] * 100:g})")
