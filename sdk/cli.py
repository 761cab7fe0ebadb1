"""The ``edgeswarm`` command line.

Errors that edgeswarm raises on purpose are printed as one line naming the problem and
the fix (exit status 2); anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import edgeswarm
from edgeswarm.bench.snn import bench_snn_cmd
from edgeswarm.cli_agent import agent_cmd, bench_agent_cmd, devices_cmd, keygen_cmd
from edgeswarm.cli_compression import bench_compression_cmd
from edgeswarm.cli_e2e import bench_e2e_cmd
from edgeswarm.cli_export import export_cmd
from edgeswarm.cli_placement import bench_placement_cmd, place_cmd, simulate_cmd
from edgeswarm.cli_testbed import testbed_cmd
from edgeswarm.cli_tp import bench_tp_cmd
from edgeswarm.cli_train import train_command

app = typer.Typer(help="edgeswarm: deploy neural networks across a dynamic cluster of edge "
                       "devices. Run 'edgeswarm COMMAND --help' for a command's options.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Measure this machine: 'edgeswarm bench AREA [--json]'.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")
placement_app = typer.Typer(help="The placement policy: 'edgeswarm placement train'.",
                            no_args_is_help=True)
app.add_typer(placement_app, name="placement")

err = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgeswarm {edgeswarm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit."),
          verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug detail.")
          ) -> None:
    """edgeswarm: deploy neural networks across a dynamic cluster of edge devices."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:  # ONNX Runtime's quantizer logs advice on the root logger at every call
        for handler in logging.getLogger().handlers:
            handler.addFilter(lambda r: "onnxruntime" not in r.pathname)


@app.command("models")
def models_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List the model zoo."""
    from edgeswarm.models import zoo

    rows = {name: zoo.describe(name) for name in zoo.names()}
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "description")
    for name, text in rows.items():
        table.add_row(name, text)
    out.print(table)


@app.command("graph")
def graph_cmd(model: str = typer.Argument(..., help="A zoo name (see 'edgeswarm models')."),
              as_json: bool = typer.Option(False, "--json",
                                           help="Print edgeswarm.taskgraph/1 JSON.")) -> None:
    """Print a model's task graph: one row per layer-level task with its costs."""
    from edgeswarm.models import zoo
    from edgeswarm.models.graph import extract

    with err.status(f"loading {model} and tracing its graph"):
        z = zoo.load(model)
        graph = extract(z.module, z.example_inputs, name=z.name)
    if as_json:
        typer.echo(graph.dumps())
        return
    table = Table("task", "kind", "MFLOPs", "params", "out", "split", "inputs from",
                  title=f"{z.name}: {len(graph.tasks)} tasks, {graph.total_flops / 1e6:.2f} "
                        f"MFLOPs per sample, {_size(graph.total_param_bytes)} of parameters")
    for t in graph.tasks:
        srcs = ", ".join(e.src for e in graph.predecessors(t.id))
        table.add_row(t.id, t.kind, f"{t.flops / 1e6:.3f}", _size(t.param_bytes),
                      _size(t.out_bytes), "yes" if t.splittable else "", srcs)
    out.print(table)


@app.command("compile")
def compile_cmd(model: str = typer.Argument(..., help="A zoo name or an .onnx file."),
                runtime: str = typer.Option(..., "--runtime", "-r",
                                            help="torch | onnx | onnx-int8 | tflite-int8 | snn"),
                output: Path = typer.Option(..., "--output", "-o", help="Artifact to write."),
                scheme: str = typer.Option(
                    "auto", "--int8-scheme",
                    help="auto | static | dynamic | weight-only (onnx-int8 only)"),
                ) -> None:
    """Compile a model for one runtime and write the artifact."""
    from edgeswarm.models.runtimes import compile as compile_model

    if runtime == "torch":
        raise edgeswarm.InvalidInput("runtime 'torch' has no artifact to write; choose onnx, "
                                     "onnx-int8 or tflite-int8")
    with err.status(f"compiling {model} for {runtime}"):
        exe = compile_model(model, runtime, output=output, int8_scheme=scheme)
    out.print(f"wrote {exe.path} ({_size(exe.size_bytes)}, runtime {exe.runtime}, inputs "
              f"{', '.join(exe.input_names)})")


@app.command("demo")
def demo_cmd(
        single_device: bool = typer.Option(
            False, "--single-device", help="The single-device runtimes tour instead."),
        gantt: Path = typer.Option(Path("edgeswarm-demo-gantt.png"), "--gantt",
                                   help="Where to write the Gantt chart of the plan."),
) -> None:
    """A 4-device testbed on this machine: a real model placed, deployed and run."""
    if single_device:
        from edgeswarm.demo import run_demo

        run_demo(out, err)
        return
    from edgeswarm.demo_cluster import run_cluster_demo

    run_cluster_demo(out, err, gantt=gantt)


@bench_app.command("runtimes")
def bench_runtimes(as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
                   models: list[str] = typer.Option(None, "--model", "-m",
                                                    help="Only these zoo models (repeatable)."),
                   runtimes: list[str] = typer.Option(None, "--runtime", "-r",
                                                      help="Only these runtimes (repeatable)."),
                   rounds: int = typer.Option(30, help="Timing rounds per model (at most)."),
                   budget: float = typer.Option(20.0, help="Timing seconds per model (at most)."),
                   ) -> None:
    """Accuracy, latency, throughput and size of every zoo model on every runtime."""
    from edgeswarm.bench import runtimes as bench

    with err.status("benchmarking") as status:
        result = bench.run(models or None, runtimes or None, rounds=rounds, budget_s=budget,
                           progress=lambda msg: status.update(msg))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table("model", "runtime", "accuracy", "latency b1 (ms)", "throughput b32 (/s)",
                  "size", title=f"runtimes, {result['threads']} threads")
    for r in result["results"]:
        if r["error"]:
            table.add_row(r["model"], r["runtime"], f"[red]{r['error'][:70]}[/red]", "", "", "")
            continue
        table.add_row(r["model"], r["runtime"], _num(r["accuracy"], 4),
                      _num(r["latency_ms_b1"], 3), _num(r["throughput_b32"], 1),
                      _size(r["size_bytes"]))
    out.print(table)
    summary = Table("model", "int8 speedup (onnx b32)", "int8 accuracy drop")
    for name, s in result["models"].items():
        summary.add_row(name, _num(s["int8_speedup"], 2), _num(s["int8_accuracy_drop"], 4))
    out.print(summary)


# Placement commands live in their own modules (cli_placement.py, cli_train.py).
app.command("place")(place_cmd)
app.command("simulate")(simulate_cmd)
bench_app.command("placement")(bench_placement_cmd)
placement_app.command("train")(train_command)
# Device-agent commands live in cli_agent.py.
app.command("agent")(agent_cmd)
app.command("devices")(devices_cmd)
app.command("keygen")(keygen_cmd)
bench_app.command("agent")(bench_agent_cmd)
# The simulated edge testbed lives in cli_testbed.py.
app.command("testbed")(testbed_cmd)
# The end-to-end benchmark (a testbed, a deployment, kill -9) lives in cli_e2e.py.
bench_app.command("e2e")(bench_e2e_cmd)
app.command("export")(export_cmd)
# The compression benchmark lives in cli_compression.py.
bench_app.command("compression")(bench_compression_cmd)
# The spiking benchmark lives in bench/snn.py.
bench_app.command("snn")(bench_snn_cmd)
# The tensor-parallel benchmark lives in cli_tp.py.
bench_app.command("tp")(bench_tp_cmd)



def _num(x: Any, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def main() -> None:
    try:
        app()
    except edgeswarm.Error as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False,
                  soft_wrap=True)
        sys.exit(2)
