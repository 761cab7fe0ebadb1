"""``edgeswarm export``: a model cut by a plan into the files devices (or an app) load.

Writes one artifact per stage (ONNX fp32 or int8, or full-integer ``.tflite``) and
``manifest.json``: the ``edgeswarm.manifest/1`` pipeline (rank 0 the caller, each stage's
device, ranks it receives from and sends to, every artifact's sha256, size and a
``file://`` URL), signed with the cluster key. Registered in :mod:`edgeswarm.cli`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from edgeswarm.placement.errors import InvalidInput

err = Console(stderr=True)
out = Console()


def export_cmd(
        model: str = typer.Argument(..., help="A zoo model name (edgeswarm models)."),
        plan_file: Path = typer.Option(..., "--plan", help="An edgeswarm.plan/1 JSON file "
                                                           "made for this model's graph."),
        output: Path = typer.Option(..., "--output", "-o", help="Directory to write into."),
        runtime: str = typer.Option("onnx", "--runtime",
                                    help="onnx, onnx-int8 or tflite-int8 (every stage)."),
        key_file: Path | None = typer.Option(None, "--key-file",
                                             help="Cluster key to sign the manifest with."),
        store: str = typer.Option("127.0.0.1:29500", "--store",
                                  help="HOST:PORT of the rendezvous store the caller hosts."),
) -> None:
    """Cut MODEL by a plan into per-device shards plus a signed manifest."""
    from edgeswarm.cli_agent import default_key_file
    from edgeswarm.cluster import prepare
    from edgeswarm.device_agent import keys
    from edgeswarm.device_agent.manifest import Artifact, write_signed
    from edgeswarm.models.partition import export, partition
    from edgeswarm.placement.plan import Plan
    from edgeswarm.shards import manifest_for

    try:
        plan = Plan.from_json(plan_file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"cannot read plan {plan_file}: {exc.strerror or exc}") from None
    host, _, port = store.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInput(f"--store {store!r} must be HOST:PORT")
    key = keys.read(key_file or default_key_file())
    m = prepare(model)
    with err.status(f"cutting {m.name} into stages and exporting them for {runtime}"):
        part = partition(m.module, m.example_inputs, plan, m.trace())
        calib = m.calibration if runtime.endswith("int8") else None
        files = export(part, m.example_inputs, output, runtime, calibration=calib)
    artifacts = [Artifact(name=f.path.name, sha256=f.sha256, size=f.size,
                          url=f.path.resolve().as_uri()) for f in files]
    runtimes: dict[str, str] = {str(s.device): runtime for s in part.stages}
    manifest = manifest_for(part, artifacts, runtimes, deployment=m.name, generation=1,
                            model=m.name, store=(host, int(port)))
    path = write_signed(output / "manifest.json", key, manifest)
    for f in files:
        out.print(f"stage {f.stage} on {f.device}: {f.path.name} ({f.size} bytes, "
                  f"sha256 {f.sha256[:12]}...)")
    out.print(f"wrote {path} (signed; {len(files)} stage(s), devices "
              f"{', '.join(dict.fromkeys(part.devices))})")
