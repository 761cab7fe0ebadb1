"""Per-device Gantt charts of a simulated plan (matplotlib, Agg: no display needed).

One row per device, one bar per task it runs (a tensor-parallel task is drawn on every
member of its group, hatched). Transfers between devices are optional: a thin grey bar
under the receiving device's row from the sender's finish to the data's arrival.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeswarm.placement.cluster import Cluster, DeviceId
from edgeswarm.placement.codecs import DEFAULT_CODECS, CodecSpec, codec
from edgeswarm.placement.plan import Plan, Schedule
from edgeswarm.placement.taskgraph import TaskGraph, TaskId


@dataclass(frozen=True)
class Transfer:
    """The output of ``edge[0]`` travelling from ``src`` to ``dst`` for ``edge[1]``."""

    edge: tuple[TaskId, TaskId]
    src: DeviceId
    dst: DeviceId
    start: float
    end: float


def transfers_of(graph: TaskGraph, cluster: Cluster, plan: Plan, schedule: Schedule,
                 codec_table: Mapping[str, CodecSpec] = DEFAULT_CODECS) -> list[Transfer]:
    """Every cross-device transfer the simulator charges for ``plan`` (codecs included)."""
    out: list[Transfer] = []
    for e in graph.edges:
        senders = plan.devices_of(e.src)
        spec = codec(plan.codecs.get((e.src, e.dst), "none"), codec_table)
        sent = schedule.slots[e.src].end
        for dst in plan.devices_of(e.dst):
            if dst in senders:
                continue
            dst_flops = cluster.device(dst).flops
            best, best_src = float("inf"), senders[0]
            for src in senders:
                s = (spec.encode_s(e.bytes, cluster.device(src).flops)
                     + cluster.transfer_s(src, dst, spec.wire_bytes(e.bytes))
                     + spec.decode_s(e.bytes, dst_flops))
                if s < best:
                    best, best_src = s, src
            out.append(Transfer((e.src, e.dst), best_src, dst, sent, sent + best))
    return out


def draw(schedule: Schedule, path: str | Path, title: str = "",
         transfers: Sequence[Transfer] = (), devices: Sequence[DeviceId] | None = None,
         ) -> Path:
    """Write a Gantt chart of ``schedule`` to ``path`` (format from its suffix)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    timeline = schedule.device_timeline()
    rows = list(devices) if devices is not None else sorted(timeline)
    y = {d: i for i, d in enumerate(rows)}
    fig = Figure(figsize=(10, 1.2 + 0.45 * max(len(rows), 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = _palette()
    task_ids = list(schedule.slots)
    colour = {t: colours[i % len(colours)] for i, t in enumerate(task_ids)}
    span = schedule.makespan or 1.0
    for d, items in timeline.items():
        if d not in y:
            continue
        for tid, slot in items:
            tp = len(slot.devices) > 1
            ax.barh(y[d], slot.end - slot.start, left=slot.start, height=0.6,
                    color=colour[tid], edgecolor="black", linewidth=0.4,
                    hatch="//" if tp else None)
            if (slot.end - slot.start) > 0.04 * span:
                ax.text((slot.start + slot.end) / 2, y[d], tid, ha="center", va="center",
                        fontsize=7, clip_on=True)
    for tr in transfers:
        if tr.dst in y:
            ax.barh(y[tr.dst] + 0.38, tr.end - tr.start, left=tr.start, height=0.1,
                    color="grey", alpha=0.6)
    ax.set_yticks(range(len(rows)), [str(d) for d in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, span * 1.02)
    ax.set_xlabel("time (s)")
    ax.set_title(title or f"makespan {schedule.makespan:.6g} s", loc="left")
    handles = []
    if any(len(slot.devices) > 1 for slot in schedule.slots.values()):
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                             label="tensor-parallel"))
    if transfers:
        handles.append(Patch(facecolor="grey", alpha=0.6, label="transfer in"))
    if handles:
        ax.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2,
                  fontsize=7, frameon=False)
    fig.tight_layout()
    target = Path(path)
    fig.savefig(target, dpi=120)
    return target


def _palette() -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [cmap(i) for i in range(cmap.N)]
