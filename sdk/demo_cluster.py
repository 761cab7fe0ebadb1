"""``edgeswarm demo``: the whole system in about a minute, on this machine.

A 4-device mixed testbed (real agent processes with emulated speeds and 100 Mbit/5 ms
links, an embedded MQTT broker), a zoo model placed by the GNN policy on the profiles the
agents measured, its stages exported and deployed, held-out images run through the
pipeline and checked against the model on one device; then the plan, a Gantt chart,
predicted vs measured latency and a per-device summary. ``--single-device`` shows the
runtimes tour instead (:mod:`edgeswarm.demo`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

DEMO_MODEL = "scene-cnn"
DEVICES = 4
#: The demo shows placement, not failure detection: four agents exporting and loading
#: stages on two shared cores can miss the default 1.5 s heartbeat window mid-deploy.
HEARTBEAT_TIMEOUT_S = 5.0
LINK = "100mbit:5ms"
REQUESTS = 20
BATCH = 32


def run_cluster_demo(out: Console, err: Console, model_name: str = DEMO_MODEL,
                     gantt: Path = Path("edgeswarm-demo-gantt.png"),
                     requests: int = REQUESTS) -> None:
    from edgeswarm.cluster import Cluster
    from edgeswarm.gantt import draw, transfers_of
    from edgeswarm.models import zoo
    from edgeswarm.placement.simulator import simulate
    from edgeswarm.testbed import Testbed, TestbedConfig
    from edgeswarm.testbed_profile import load_profile

    started = time.perf_counter()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                        console=err, transient=True)
    with progress:
        step = progress.add_task(f"loading {model_name} (trains on first use)")
        model = zoo.load(model_name)
        x = model.heldout.inputs[0][:BATCH]
        labels = model.heldout.labels[:BATCH].numpy() if model.heldout.labels is not None else None
        import torch

        with torch.inference_mode():
            reference = model.module(x).numpy()
        progress.update(step, description=f"starting a {DEVICES}-device testbed ({LINK} links)")
        config = TestbedConfig(profile=load_profile("mixed", DEVICES, LINK), cluster="demo")
        with Testbed(config) as testbed:
            up_s = time.perf_counter() - started
            with Cluster.connect(testbed.broker_uri, testbed.cluster, testbed.key,
                                 expect=DEVICES, timeout_s=30,
                                 heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S) as cluster:
                progress.update(step, description="placing with the GNN policy")
                plan = cluster.place(model_name, [x], policy="gnn")
                progress.update(step, description="exporting stages and deploying")
                t0 = time.perf_counter()
                dep = cluster.deploy(model_name, plan, [x])
                deploy_s = time.perf_counter() - t0
                progress.update(step, description=f"running {requests} requests")
                wrong = 0
                outputs = None
                for _ in range(requests):
                    outputs = dep.run(x.numpy())
                    wrong += not np.allclose(outputs, reference, atol=1e-4)
                accuracy = (float((np.argmax(outputs, axis=1) == labels).mean())
                            if labels is not None and outputs is not None else float("nan"))
                gen = dep.generations[-1]
                topology = cluster.topology()
                schedule = simulate(dep.model.graph, topology, dep.plan)
                draw(schedule, gantt, title=f"{model_name} on the demo testbed (predicted)",
                     transfers=transfers_of(dep.model.graph, topology, dep.plan, schedule))
                states = {s.device.id: s for s in cluster.devices}
                telemetry = dict(cluster.coordinator.telemetry)
                dep.close()
    total = time.perf_counter() - started

    out.print(_plan_table(dep))
    summary = Table(title="per device", title_justify="left")
    for col in ("device", "speed", "GFLOP/s (measured)", "tasks", "link"):
        summary.add_column(col, justify="left" if col == "device" else "right")
    tasks_on: dict[str, int] = {}
    for devices in dep.plan.assignments.values():
        for d in devices:
            tasks_on[d] = tasks_on.get(d, 0) + 1
    for name, s in sorted(states.items()):
        link = s.links.get("*")
        summary.add_row(name, f"{s.device.speed:g}", f"{s.device.flops / 1e9:.2f}",
                        str(tasks_on.get(name, 0)),
                        f"{link.bandwidth_Bps * 8 / 1e6:.0f} Mbit/s, "
                        f"{link.latency_s * 1e3:.0f} ms" if link else "-")
    out.print(summary)
    err_rel = gen.measured_median_s / gen.predicted_s - 1
    out.print(f"requests: {requests} x batch {BATCH}, wrong results: {wrong}, "
              f"accuracy {accuracy:.3f} (held-out images)")
    out.print(f"latency per request: predicted {gen.predicted_s * 1e3:.1f} ms, measured "
              f"median {gen.measured_median_s * 1e3:.1f} ms ({err_rel:+.0%})")
    out.print(f"testbed up in {up_s:.1f} s, deployed in {deploy_s:.1f} s, demo took "
              f"{total:.0f} s; Gantt chart: {gantt}")
    if telemetry:
        out.print(f"telemetry from {len(telemetry)} device(s)")


def _plan_table(dep: object) -> Table:
    from edgeswarm.deployment import Deployment

    assert isinstance(dep, Deployment)
    table = Table(title=f"plan ({dep.plan.policy}): stages in pipeline order",
                  title_justify="left")
    for col in ("stage", "device", "tasks"):
        table.add_column(col)
    part = dep._partition
    assert part is not None
    for stage in part.stages:
        names = ", ".join(stage.tasks)
        table.add_row(str(stage.index), stage.device,
                      names if len(names) < 70 else names[:67] + "...")
    return table
