"""``edgeswarm bench compression``: registered on the app in :mod:`edgeswarm.cli`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()


def bench_compression_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        plot: Path = typer.Option(Path("compression.png"), "--plot",
                                  help="Where to write the rate–accuracy plot (PNG)."),
        betas: list[float] = typer.Option(None, "--beta",
                                          help="Rate weights of the learned codec "
                                               "(repeatable; default: the cached set)."),
        samples: int | None = typer.Option(None, "--samples",
                                           help="Score only the first N held-out scenes."),
        timed: int = typer.Option(200, "--timed", help="Samples timed per codec."),
        e2e_requests: int = typer.Option(100, "--e2e-requests",
                                         help="Requests per codec in the end-to-end run."),
        skip_e2e: bool = typer.Option(False, "--skip-e2e",
                                      help="Skip the end-to-end testbed run (\"e2e\": null)."),
) -> None:
    """Rate–accuracy of feature codecs (none, fp16, int8, learned) and input codecs
    (PNG, JPEG, WebP) on scene-cnn's held-out scenes, with a plot; then scene-cnn split
    over two testbed agents on a 10 Mbit/s, 20 ms link, latency with each codec."""
    from edgeswarm.bench import compression as bench

    with err.status("benchmarking codecs") as status:
        doc = bench.run(betas or None, samples, timed, progress=lambda m: status.update(m),
                        e2e_requests=None if skip_e2e else e2e_requests)
    bench.plot(doc, plot)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table("codec", "setting", "bytes/sample", "accuracy", "encode ms", "decode ms",
                  title=f"scene-cnn codecs (teacher accuracy {doc['teacher_accuracy']:.3f}; "
                        f"features after {bench.SPLIT})")
    for p in doc["points"]:
        table.add_row(p["codec"], p["setting"] or "", f"{p['bytes_per_sample']:.1f}",
                      f"{p['accuracy']:.3f}", f"{p['encode_ms']:.3f}", f"{p['decode_ms']:.3f}")
    out.print(table)
    s = bench.summary(doc)
    best, rival = s["learned"], s["input_codec"]
    if best is not None:
        where = ("within" if s["within_tolerance"] else "NOT within")
        out.print(f"learned β={best['setting']}: {best['bytes_per_sample']:.1f} B at accuracy "
                  f"{best['accuracy']:.3f} ({s['points_below_teacher']} points below the "
                  f"teacher, {where} {s['tolerance'] * 100:.0f}), {s['reduction_vs_fp32']}x "
                  "fewer bytes than fp32 features")
        if rival is not None:
            out.print(f"smallest input codec as accurate: {rival['codec']} {rival['setting'] or ''}"
                      f" {rival['bytes_per_sample']:.1f} B (accuracy {rival['accuracy']:.3f})")
    out.print(f"plot: {plot}")
    if doc["e2e"] is not None:
        _print_e2e(doc["e2e"])


def _print_e2e(e2e: dict[str, Any]) -> None:
    from edgeswarm.bench import compression_e2e

    table = Table("codec", "p50 ms", "p90 ms", "pred. ms", "B/req", "acc.", "agree", "wrong",
                  title=f"end to end: scene-cnn split after {e2e['split']} over "
                        f"{e2e['devices']} agents, link {e2e['link']}, "
                        f"{e2e['requests']} requests")
    for r in e2e["runs"]:
        name = r["codec"] if r["setting"] is None else f"{r['codec']}:{r['setting']}"
        table.add_row(name, f"{r['latency_ms_p50']:.1f}", f"{r['latency_ms_p90']:.1f}",
                      f"{r['predicted_ms']:.1f}", f"{r['bytes_per_request']:.0f}",
                      f"{r['accuracy']:.3f}", f"{r['agreement']:.3f}", str(r["wrong_results"]))
    out.print(table)
    s = compression_e2e.summary(e2e)
    ratios = ", ".join(f"{k} {v}x" for k, v in s["speedup_vs_none"].items())
    out.print(f"p50 speed-up against no codec: {ratios}")
