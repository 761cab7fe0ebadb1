"""``edgeswarm placement train``: train the GNN placement policy's checkpoint.

Registered on the app in :mod:`edgeswarm.cli`. Shows a progress bar over the time
budget, then the validation metrics and the files written. Copy the two ``giph.*``
files into ``placement/gnn/`` to ship them as the default checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeswarm.placement.errors import InvalidInput

err = Console(stderr=True)
stdout = Console()


def train_command(
        out: Path = typer.Option(Path("giph-checkpoint"), "--out", "-o",
                                     help="Directory to write giph.safetensors, giph.json "
                                          "and training_curve.png into."),
        minutes: float = typer.Option(25.0, "--minutes", help="Training time budget."),
        seed: int = typer.Option(0, "--seed", help="Seed of instances, sampling and weights."),
) -> None:
    """Train the GNN placement policy (REINFORCE on generated instances)."""
    if not minutes > 0:
        raise InvalidInput(f"--minutes must be > 0, got {minutes}")
    from edgeswarm.placement.gnn.train import train

    total = 60.0 * minutes
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("", total=total)

        def progress(info: dict[str, Any]) -> None:
            desc = (f"episode {info['episode']}  validation makespan/HEFT "
                    f"{info.get('best_val_ratio_heft', float('nan')):.4f}")
            if info.get("done"):
                bar.update(task, completed=total, description="saving")
            else:
                bar.update(task, completed=min(info["elapsed_s"], total), description=desc)

        t0 = time.perf_counter()
        result = train(out, minutes=minutes, seed=seed, progress=progress)
    table = Table("metric", "value", title=f"trained in {time.perf_counter() - t0:.0f} s, "
                                           f"{result.episodes} episodes")
    for key, value in result.metrics.items():
        table.add_row(key, str(value))
    stdout.print(table)
    for path in (result.weights, result.config, result.curve):
        stdout.print(f"wrote {path}")
