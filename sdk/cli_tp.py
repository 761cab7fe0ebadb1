"""``edgeswarm bench tp``: registered on the app in :mod:`edgeswarm.cli`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

err = Console(stderr=True)
out = Console()


def bench_tp_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        quick: bool = typer.Option(False, "--quick",
                                   help="A small matrix (1 and 2 devices, short inputs)."),
        repeats: int | None = typer.Option(None, "--repeats",
                                           help="Runs of each job; the best is kept "
                                                "(default 3, --quick 1)."),
        models: list[str] = typer.Option(None, "--model", "-m",
                                         help="Only these models: minilm, smollm2 "
                                              "(repeatable)."),
        window: int = typer.Option(2, "--window",
                                   help="Layers resident with the sliding window on."),
) -> None:
    """Tensor-parallel minilm and smollm2 on 1, 2 and 4 one-core devices: speed, outputs
    against one device, memory; star vs ring vs direct all-reduce; links emulated."""
    from edgeswarm.bench import tp as bench

    with err.status("benchmarking tensor parallelism") as status:
        doc = bench.run(quick=quick, repeats=repeats, models=models or bench.MODELS,
                        window=window, progress=lambda m: status.update(m))
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    table = Table("model", "dev", "link", "all-reduce", "window", "throughput", "ttft ms",
                  "tpot ms", "max |diff|", "params/dev", "peak RSS", "coll ms (p/d)",
                  title=f"tensor parallelism, one core per device (best of {doc['repeats']})")
    for r in doc["runs"]:
        coll = r["collective_ms"]
        table.add_row(r["model"], str(r["devices"]), r["link"], r["allreduce"],
                      str(r["window"] or "off"), f"{r['throughput']:.2f}",
                      _num(r["ttft_ms"], 1), _num(r["tpot_ms"], 2),
                      f"{r['max_abs_diff']:.1e}", _mb(r["param_bytes_per_device"]),
                      _mb(r["peak_rss_bytes"]),
                      f"{coll['prefill']:.2f}/{coll['decode']:.2f}")
    out.print(table)
    for name, key in (("speedup", "speedup"), ("per-token speedup", "speedup_tpot")):
        for model, by_k in doc[key].items():
            figures = ", ".join(f"{k} devices {_num(v, 2)}x" for k, v in by_k.items())
            out.print(f"{name} {model}: {figures}")
    coll = Table("devices", "all-reduce", "shape", "ms", "predicted ms",
                 title="all-reduces alone (no link)")
    for c in doc["collectives"]:
        coll.add_row(str(c["devices"]), c["allreduce"], "x".join(map(str, c["shape"])),
                     f"{c['ms']:.3f}", f"{c['predicted_ms']:.3f}")
    out.print(coll)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"
