"""Tensor-parallel plans the cluster can deploy: one group of devices runs the whole model.

A deployed tensor-parallel plan puts every splittable task (attention, MLP) of a zoo
transformer on one group of devices, split in proportion to their speeds, and the rest
(embeddings, norms) on the group's first, fastest member; see
:mod:`edgeswarm.models.tp.shards` for what each member runs. :func:`place_group` picks the
group the simulator predicts fastest among the k fastest devices for every k, so a
re-plan after a member leaves is the same choice over the devices left.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeswarm.device_agent.artifacts import ArtifactServer
from edgeswarm.device_agent.manifest import COORDINATOR, Artifact, LinkShape, Manifest, Shard
from edgeswarm.placement.cluster import Cluster as Topology
from edgeswarm.placement.cluster import Device, DeviceId
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.simulator import simulate
from edgeswarm.placement.taskgraph import TaskGraph

POLICY = "tp-group"


def group_of(plan: Plan) -> tuple[DeviceId, ...] | None:
    """The tensor-parallel group ``plan`` runs on, or None for a plan without one.

    Raises InvalidInput for a plan with several different groups: a deployment runs one
    group for the whole model."""
    groups = {devs for devs in plan.assignments.values() if len(devs) > 1}
    if not groups:
        return None
    if len(groups) > 1:
        shown = "; ".join(",".join(g) for g in sorted(groups))
        raise InvalidInput(f"the plan puts tasks on {len(groups)} different tensor-parallel "
                           f"groups ({shown}); a deployment runs one group for the whole "
                           "model: plan with cluster.place(model, tp=True)")
    return next(iter(groups))


def group_plan(graph: TaskGraph, group: Sequence[DeviceId]) -> Plan:
    """Splittable tasks on ``group``, the others on its first member."""
    lead = (group[0],)
    return Plan({t.id: tuple(group) if t.splittable and len(group) > 1 else lead
                 for t in graph.tasks}, policy=POLICY)


def place_group(graph: TaskGraph, topology: Topology, max_members: int) -> Plan:
    """The fastest predicted group among the k fastest devices, k = 1 .. ``max_members``."""
    if not any(t.splittable for t in graph.tasks):
        raise InvalidInput("the model has no splittable task (attention, MLP): it cannot run "
                           "tensor-parallel")
    ranked = sorted(topology.devices, key=lambda d: -d.flops)
    best: Plan | None = None
    reasons = []
    for k in range(1, min(len(ranked), max_members) + 1):
        plan = group_plan(graph, [d.id for d in ranked[:k]])
        schedule = simulate(graph, topology, plan)
        if not schedule.feasible:
            reasons.append(f"{k} device(s): {schedule.reason}")
            continue
        if best is None or schedule.makespan < best.predicted_latency_s:
            best = plan.with_schedule(schedule)
    if best is None:
        raise PlacementInfeasible("no group of the fastest devices can run the model: "
                                  + "; ".join(reasons))
    return best


class GroupShards:
    """Members' shard files of one model, by group and speeds, served to the devices: a
    re-plan onto a group seen before slices nothing again."""

    def __init__(self, server: ArtifactServer, module: Any,
                 directory: Path | None = None) -> None:
        from edgeswarm.models.tp.shards import BUILDER, kind_of

        kind = kind_of(module)
        if kind is None:
            raise InvalidInput(f"{type(module).__name__} has no tensor-parallel split: deploy "
                               "a zoo transformer (minilm, smollm2) on a group")
        self.builder = BUILDER[kind]
        self.server = server
        self.module = module
        self.dir = directory or Path(tempfile.mkdtemp(prefix="edgeswarm-tp-"))
        self._files: dict[tuple[Any, ...], list[tuple[Artifact, dict[str, Any]]]] = {}

    def members(self, group: Sequence[str], speeds: Sequence[float]
                ) -> list[tuple[Artifact, dict[str, Any]]]:
        """Each member's artifact and shard params (sliced and added now if not yet)."""
        from edgeswarm.models.tp.shards import member_files

        key = (tuple(group), tuple(round(s / max(speeds), 3) for s in speeds))
        if key not in self._files:
            out = self.dir / f"{len(self._files):03d}"
            files = member_files(self.module, speeds, out)
            self._files[key] = [(self.server.add(path, name=f"{d}-{path.name}"), params)
                                for d, (path, params) in zip(group, files, strict=True)]
        return self._files[key]


def group_manifest(files: GroupShards, topology: Topology, group: Sequence[str], *,
                   deployment: str, generation: int, model: str, store: tuple[str, int],
                   links: Mapping[str, LinkShape] | None = None,
                   timeout_s: float = 30.0) -> Manifest:
    """The manifest of one tensor-parallel group: rank 0 (the coordinator) sends every
    request to every member; the first member sends the result back. The all-reduce
    algorithm is "auto" over the slowest link among the members (see
    :mod:`edgeswarm.models.tp.collective`)."""
    devices: dict[str, Device] = {d.id: d for d in topology.devices}
    missing = [d for d in group if d not in devices]
    if missing:
        raise InvalidInput(f"the group names device(s) {missing} the cluster does not have")
    speeds = [devices[d].flops for d in group]
    ranks = {COORDINATOR: 0} | {d: i + 1 for i, d in enumerate(group)}
    tp_group = [ranks[d] for d in group]
    pairs = [topology.link(a, b) for a in group for b in group if a != b]
    slowest = max(pairs, key=lambda ln: ln.latency_s + 1e5 / ln.bandwidth_Bps, default=None)
    shards = []
    for i, (d, (art, params)) in enumerate(zip(group, files.members(group, speeds),
                                               strict=True)):
        if slowest is not None:
            params = params | {"link": {"latency_s": slowest.latency_s,
                                        "bandwidth_Bps": slowest.bandwidth_Bps}}
        shards.append(Shard(id=f"tp{i}", device=d, runtime="safetensors", artifact=art,
                            builder=files.builder, params=params, recv_from=[0],
                            send_to=[0] if i == 0 else [], tp_group=tp_group))
    return Manifest(deployment=deployment, generation=generation, model=model,
                    store_host=store[0], store_port=store[1], world_size=len(ranks),
                    ranks=ranks, shards=shards, timeout_s=timeout_s, links=dict(links or {}))

