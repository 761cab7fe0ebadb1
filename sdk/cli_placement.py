"""The placement commands: ``edgeswarm place``, ``simulate`` and ``bench placement``.

Registered on the app in :mod:`edgeswarm.cli`. Inputs are the JSON interchange files
(``edgeswarm.taskgraph/1``, ``edgeswarm.cluster/1``, ``edgeswarm.plan/1``); ``--graph``
also takes a zoo model name, whose graph is extracted as ``edgeswarm graph`` does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeswarm.placement.cluster import Cluster
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan, Schedule
from edgeswarm.placement.policies import POLICIES, Options, place
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.taskgraph import TaskGraph

err = Console(stderr=True)
out = Console()

GRAPH_HELP = "Task graph: an edgeswarm.taskgraph/1 JSON file or a zoo model name."
CLUSTER_HELP = "Cluster: an edgeswarm.cluster/1 JSON file."


def place_cmd(
        graph: str = typer.Option(..., "--graph", "-g", help=GRAPH_HELP),
        cluster: Path = typer.Option(..., "--cluster", "-c", help=CLUSTER_HELP),
        policy: str = typer.Option("heft", "--policy", "-p",
                                   help=f"One of {' | '.join(POLICIES)}."),
        no_tp: bool = typer.Option(False, "--no-tp", help="No tensor-parallel groups."),
        no_codecs: bool = typer.Option(False, "--no-codecs", help="No codecs on cut edges."),
        budget: int | None = typer.Option(
            None, "--budget", help="Simulator calls for search and gnn (default 2|V|)."),
        seed: int = typer.Option(0, "--seed", help="Seed of randomized policies."),
        as_json: bool = typer.Option(False, "--json", help="Print edgeswarm.plan/1 JSON."),
        plot: Path | None = typer.Option(None, "--plot", help="Write a per-device Gantt chart "
                                                         "(e.g. gantt.png)."),
) -> None:
    """Plan where every task of a graph runs on a cluster, and when."""
    if budget is not None and budget < 0:
        raise InvalidInput(f"--budget must be >= 0, got {budget}")
    g, c = load_graph(graph), load_cluster(cluster)
    opts = Options(budget=budget, tp=not no_tp, codecs=not no_codecs, seed=seed)
    plan = place(g, c, policy, opts, clock=time.perf_counter)
    assert plan.schedule is not None  # place() always simulates
    if plot is not None:
        _plot(g, c, plan, plan.schedule, plot, f"{policy}: makespan "
                                               f"{plan.schedule.makespan:.6g} s")
    if as_json:
        typer.echo(plan.dumps())
        if plot is not None:
            err.print(f"wrote {plot}", highlight=False)
        return
    out.print(_slots_table(plan, plan.schedule, f"{policy} plan: {len(g.tasks)} tasks on "
                           f"{len(plan.used_devices())} of {len(c.devices)} devices"))
    for (src, dst), name in plan.codecs.items():
        out.print(escape(f"codec {name} on {src} -> {dst}"))
    out.print(f"predicted latency: {plan.schedule.makespan:.6g} s")
    out.print(f"decision: {plan.decision_s * 1e3:.3f} ms")
    out.print(f"simulator calls: {plan.simulator_calls}")
    if plot is not None:
        out.print(f"wrote {plot}")


def simulate_cmd(
        graph: str = typer.Option(..., "--graph", "-g", help=GRAPH_HELP),
        cluster: Path = typer.Option(..., "--cluster", "-c", help=CLUSTER_HELP),
        plan_file: Path = typer.Option(..., "--plan", help="An edgeswarm.plan/1 JSON file."),
        as_json: bool = typer.Option(False, "--json",
                                     help="Print the plan with its schedule as JSON."),
) -> None:
    """Evaluate a given plan: its schedule, makespan, per-device memory and feasibility."""
    g, c = load_graph(graph), load_cluster(cluster)
    plan = Plan.from_json(_read(plan_file, "plan"))
    schedule = simulate(g, c, plan)
    if as_json:
        typer.echo(plan.with_schedule(schedule).dumps())
        return
    out.print(_slots_table(plan, schedule, f"plan {plan_file.name}"))
    mem = Table("device", "memory used", "memory", "fits", title="memory per device")
    for d in c.devices:
        used = schedule.memory_bytes.get(d.id, 0)
        mem.add_row(escape(d.id), _mib(used), _mib(d.memory_bytes),
                    "yes" if used <= d.memory_bytes else "[red]no[/red]")
    out.print(mem)
    out.print(f"makespan: {schedule.makespan:.6g} s")
    out.print("feasible: yes" if schedule.feasible
              else escape(f"feasible: no ({schedule.reason})"))


def bench_placement_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        instances: int = typer.Option(100, "--instances", "-n", help="Instances per suite."),
        suites: list[str] | None = typer.Option(None, "--suite", "-s",
                                         help="Only these suites (repeatable)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the generated instances."),
        exact_s: float = typer.Option(
            1.0, "--exact-s", help="CP-SAT's deterministic time per giph_grid instance for a "
                                   "tighter lower bound (needs OR-Tools); 0: off."),
) -> None:
    """Every placement policy on generated suites: quality vs bounds and HEFT, speed."""
    from edgeswarm.bench import placement as bench

    with err.status("benchmarking placement") as status:
        result = bench.run(suites or None, instances, seed,
                           progress=lambda msg: status.update(msg), exact_s=exact_s)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for suite, doc in result["suites"].items():
        out.print(_bench_table(suite, doc))


def load_graph(spec: str) -> TaskGraph:
    """A task graph from a JSON file, or extracted from a zoo model by name."""
    path = Path(spec)
    if path.is_file() or path.suffix == ".json" or "/" in spec:
        return TaskGraph.from_json(_read(path, "task graph"))
    from edgeswarm.models import zoo
    from edgeswarm.models.graph import extract

    if spec not in zoo.names():
        raise InvalidInput(f"--graph {spec!r} is neither a file nor a zoo model "
                           f"({', '.join(zoo.names())})")
    with err.status(f"loading {spec} and tracing its graph"):
        z = zoo.load(spec)
        return extract(z.module, z.example_inputs, name=z.name)


def load_cluster(path: Path) -> Cluster:
    return Cluster.from_json(_read(path, "cluster"))


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise InvalidInput(f"{what} file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {what} file {str(path)!r}: {exc}") from None


def _slots_table(plan: Plan, schedule: Schedule, title: str) -> Table:
    table = Table("task", "devices", "start (s)", "end (s)", title=title)
    for tid, slot in sorted(schedule.slots.items(), key=lambda kv: (kv[1].start, kv[0])):
        table.add_row(escape(tid), escape(", ".join(plan.devices_of(tid))), f"{slot.start:.6g}",
                      f"{slot.end:.6g}")
    return table


def _plot(g: TaskGraph, c: Cluster, plan: Plan, schedule: Schedule, path: Path,
          title: str) -> None:
    from edgeswarm.gantt import draw, transfers_of

    try:
        draw(schedule, path, title, transfers_of(g, c, plan, schedule), c.ids)
    except (OSError, ValueError) as exc:  # unwritable path, unknown image suffix
        raise InvalidInput(f"--plot {str(path)!r}: cannot write the chart ({exc})") from None


#: Bench table columns: (header, JSON key).
STATIC_COLUMNS = (("÷LB", "mean_ratio_lb"), ("÷LB p90", "p90_ratio_lb"),
                  ("÷HEFT", "mean_ratio_heft"), (">1% worse", "worse_than_heft_frac"),
                  ("ms", "mean_decision_ms"), ("sim calls", "mean_simulator_calls"))
DYNAMIC_COLUMNS = (("÷scratch", "mean_ratio_scratch"), ("moved", "mean_tasks_moved"),
                   ("scratch moved", "mean_scratch_tasks_moved"), ("ms", "mean_decision_ms"),
                   ("scratch ms", "mean_scratch_decision_ms"), ("÷LB", "mean_ratio_lb"),
                   ("÷HEFT", "mean_ratio_heft"))


def _bench_table(suite: str, doc: dict[str, Any]) -> Table:
    cols = DYNAMIC_COLUMNS if suite == "dynamic" else STATIC_COLUMNS
    if any("mean_ratio_opt" in r for r in doc["policies"].values()):
        cols = (*cols, ("÷opt", "mean_ratio_opt"))
    proven = (f", {doc['proven_optimal']} optimum proven by CP-SAT"
              if "proven_optimal" in doc else "")
    table = Table("policy", *(h for h, _ in cols), title=f"{suite}: {doc['instances']} "
                  f"instances{proven}", caption=escape("errors: " + "; ".join(
                      f"{pol}: {r['error']}" for pol, r in doc["policies"].items()
                      if "error" in r)) if any("error" in r for r in doc["policies"].values())
                  else None, caption_justify="left")
    for pol, r in doc["policies"].items():
        if "mean_ratio_lb" not in r:
            table.add_row(pol, *("[red]error[/red]" if i == 0 else "" for i in range(len(cols))))
            continue
        table.add_row(pol, *(_fmt(r.get(k)) for _, k in cols))
    return table


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
