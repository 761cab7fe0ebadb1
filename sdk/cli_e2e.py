"""``edgeswarm bench e2e``: the end-to-end benchmark's command (the measuring is in
:mod:`edgeswarm.bench.e2e`)."""

from __future__ import annotations

import json
from collections.abc import Callable

import typer
from rich.console import Console
from rich.table import Table

from edgeswarm.bench import e2e as bench


def bench_e2e_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print the JSON list."),
        devices: list[int] = typer.Option(None, "--devices", "-n",
                                          help="Testbed sizes (repeatable; default 4 and 8)."),
        requests: int = typer.Option(50, "--requests", help="Requests before the churn."),
        batch: int = typer.Option(bench.BATCH, "--batch", help="Held-out images per request."),
        link: str = typer.Option(bench.LINK, "--link",
                                 help="Every emulated link (RATE:LATENCY)."),
        budget: float = typer.Option(60.0, "--budget",
                                     help="Seconds for the requests before the churn (at most)."),
) -> None:
    """The whole path on a testbed: discovery, deploy, requests, fidelity, kill -9."""
    err = Console(stderr=True)
    sizes = devices or [4, 8]
    with err.status("benchmarking end to end") as status:
        results = bench.run(sizes, requests, batch=batch, link=link, budget_s=budget,
                            progress=lambda msg: status.update(msg))
    if as_json:
        typer.echo(json.dumps([r.summary() for r in results], indent=2))
        return
    out = Console()
    table = Table("figure", *(f"{r.devices} agents" for r in results),
                  title=f"end to end: {bench.MODEL}, batch {batch}, mixed testbed, links {link}")

    def row(name: str, cell: Callable[[bench.SizeResult], str]) -> None:
        table.add_row(name, *(cell(r) for r in results))

    row("discovery (start -> all seen)", lambda r: _s(r.discovery_s))
    row("deploy (place + export + start)", lambda r: _s(r.deploy_s))
    row("plan", lambda r: ", ".join(r.plan))
    row("requests: failed / wrong", lambda r: f"{r.requests}: {r.failed_requests} / "
                                              f"{r.wrong_results}")
    row("latency p50 / p99", lambda r: f"{r.p50_ms:.1f} / {r.p99_ms:.1f} ms")
    row("predicted / measured", lambda r: f"{r.predicted_ms:.1f} / {r.measured_ms:.1f} ms")
    row("prediction error", lambda r: f"{r.prediction_error:+.1%}")
    row("kill -9 of", lambda r: r.churn.victim if r.churn else "-")
    row("  lost after", lambda r: _s(r.churn.lost_s if r.churn else None))
    row("  re-plan / export / redeploy",
        lambda r: " / ".join(_s(x) for x in (r.churn.plan_s, r.churn.export_s,
                                             r.churn.redeploy_s)) if r.churn else "-")
    row("  next generation ready after", lambda r: _s(r.churn.ready_s if r.churn else None))
    row("  first correct result after", lambda r: _s(r.recovery_s))
    row("  then on", lambda r: ", ".join(r.churn.devices_after) if r.churn else "-")
    row("requests during churn", lambda r: str(r.requests_during_churn))
    out.print(table)
    for r in results:
        out.print(f"{r.devices} agents, profiles measured (GFLOP/s): "
                  + ", ".join(f"{d} {g:g}" for d, g in r.profiles_gflops.items()))


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s" if x >= 1 else f"{x * 1e3:.0f} ms"
