"""``edgeswarm demo``: the single-device tour.

Loads a real zoo model (trained on first use), shows its task graph, compiles it for
every runtime installed here, runs the held-out images through each and prints
accuracy, latency and artifact size side by side.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeswarm.bench.runtimes import heldout_outputs, score
from edgeswarm.bench.timing import interleaved, median
from edgeswarm.models import zoo
from edgeswarm.models.graph import extract
from edgeswarm.models.runtimes import RUNTIMES, Executable, compile
from edgeswarm.placement.errors import Error

#: The tour's runtimes: the spiking runtime has its own benchmark (`edgeswarm bench snn`)
#: and converts only ReLU chains, slowly.
TOUR = tuple(rt for rt in RUNTIMES if rt != "snn")
DEMO_MODEL = "scene-cnn"


def run_demo(out: Console, err: Console, model_name: str = DEMO_MODEL) -> None:
    started = time.perf_counter()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TimeElapsedColumn(), console=err, transient=True)
    exes: dict[str, Executable] = {}
    skipped: dict[str, str] = {}
    with progress, tempfile.TemporaryDirectory(prefix="edgeswarm-demo-") as tmp:
        step = progress.add_task(f"loading {model_name} (trains on first use)",
                                 total=2 + len(TOUR))
        model = zoo.load(model_name)
        progress.advance(step)
        progress.update(step, description="extracting the task graph")
        graph = extract(model.module, model.example_inputs, name=model.name)
        progress.advance(step)
        for rt in TOUR:
            progress.update(step, description=f"compiling for {rt}")
            try:
                exes[rt] = compile(model_name, rt, output=Path(tmp) / f"{model_name}-{rt}")
            except Error as exc:
                skipped[rt] = str(exc)
            progress.advance(step)
        progress.update(step, description="running held-out images on every runtime")
        rows = [_measure(rt, exe, model) for rt, exe in exes.items()]

    out.print(f"[bold]{model.name}[/bold]: {model.description}")
    out.print(f"task graph: {len(graph.tasks)} tasks, {graph.total_flops / 1e6:.1f} MFLOPs "
              f"per image, {graph.total_param_bytes / 1e6:.2f} MB of parameters "
              "('edgeswarm graph scene-cnn' shows every task)")
    table = Table("runtime", "held-out accuracy", "latency b1 (ms)", "images/s (b32)",
                  "artifact size", title=f"{len(model.heldout)} held-out images, one device")
    for rt, acc, lat, thr, size in rows:
        table.add_row(rt, f"{acc:.4f}", f"{lat:.3f}", f"{thr:.0f}", f"{size / 1e6:.3f} MB")
    out.print(table)
    for rt, why in skipped.items():
        out.print(f"[yellow]{rt} skipped:[/yellow] {why}")
    out.print(f"done in {time.perf_counter() - started:.1f} s")


def _measure(rt: str, exe: Executable, model: zoo.ZooModel,
             ) -> tuple[str, float, float, float, int]:
    acc = score(model, heldout_outputs(exe, model))
    one = [x.numpy() for x in model.example_inputs]
    batch = [x.numpy() for x in model.batch(32)]
    exe.run(one)
    lat = median(interleaved([lambda: exe.run(one)], rounds=20, budget_s=5.0)[0])
    thr = 32 / median(interleaved([lambda: exe.run(batch)], rounds=5, budget_s=5.0)[0])
    return rt, acc, lat * 1e3, thr, exe.size_bytes
