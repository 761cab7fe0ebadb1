"""Plan and Schedule: where every task runs, and when.

A plan maps each task to one device, or to a tensor-parallel group of devices for a
splittable task, and may put a codec on a cut edge. The simulator turns a plan into a
schedule. Both serialize together as ``edgeswarm.plan/1``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from edgeswarm.placement.cluster import DeviceId
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.taskgraph import TaskId

FORMAT = "edgeswarm.plan/1"

EdgeKey = tuple[TaskId, TaskId]


@dataclass(frozen=True)
class Slot:
    """When one task runs: on ``devices`` (several for a tensor-parallel group)."""

    devices: tuple[DeviceId, ...]
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    """The simulator's answer for one plan: the timeline of one inference."""

    slots: Mapping[TaskId, Slot]
    makespan: float
    memory_bytes: Mapping[DeviceId, int]
    feasible: bool = True
    #: Why the plan is infeasible (empty when feasible).
    reason: str = ""

    def device_timeline(self) -> dict[DeviceId, list[tuple[TaskId, Slot]]]:
        out: dict[DeviceId, list[tuple[TaskId, Slot]]] = {}
        for tid, slot in self.slots.items():
            for d in slot.devices:
                out.setdefault(d, []).append((tid, slot))
        for items in out.values():
            items.sort(key=lambda item: item[1].start)
        return out


@dataclass(frozen=True)
class Plan:
    assignments: Mapping[TaskId, tuple[DeviceId, ...]]
    codecs: Mapping[EdgeKey, str] = field(default_factory=dict)
    policy: str = ""
    #: Priority order the simulator schedules tasks in (default: upward rank).
    order: tuple[TaskId, ...] | None = None
    schedule: Schedule | None = None
    decision_s: float = 0.0
    simulator_calls: int = 0

    @property
    def predicted_latency_s(self) -> float:
        return self.schedule.makespan if self.schedule is not None else float("nan")

    def devices_of(self, tid: str) -> tuple[DeviceId, ...]:
        try:
            return self.assignments[TaskId(tid)]
        except KeyError:
            raise InvalidInput(f"plan: task {tid!r} is not assigned") from None

    def used_devices(self) -> set[DeviceId]:
        return {d for devs in self.assignments.values() for d in devs}

    def with_schedule(self, schedule: Schedule, **changes: Any) -> Plan:
        return replace(self, schedule=schedule, **changes)

    # -- JSON ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "policy": self.policy,
            "assignments": {t: list(d) for t, d in self.assignments.items()},
            "codecs": {f"{s}->{d}": c for (s, d), c in self.codecs.items()},
        }
        if self.order is not None:
            out["order"] = list(self.order)
        if self.schedule is not None:
            out["schedule"] = {t: {"start": s.start, "end": s.end}
                               for t, s in self.schedule.slots.items()}
            out["predicted_latency_s"] = self.schedule.makespan
            out["memory_bytes"] = dict(self.schedule.memory_bytes)
            out["feasible"] = self.schedule.feasible
            if self.schedule.reason:
                out["infeasible_reason"] = self.schedule.reason
        out["decision_s"] = self.decision_s
        out["simulator_calls"] = self.simulator_calls
        return out

    def dumps(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json(), indent=indent)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | str) -> Plan:
        """Read a plan; a schedule in the document is not trusted (re-simulate it)."""
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"plan: not JSON ({exc})") from None
        if not isinstance(doc, Mapping):
            raise InvalidInput("plan: expected a JSON object")
        if doc.get("format") != FORMAT:
            raise InvalidInput(f"plan: format is {doc.get('format')!r}, expected {FORMAT!r}")
        raw = doc.get("assignments")
        if not isinstance(raw, Mapping):
            raise InvalidInput("plan: 'assignments' must map task ids to lists of device ids")
        assignments: dict[TaskId, tuple[DeviceId, ...]] = {}
        for tid, devs in raw.items():
            if isinstance(devs, str):
                devs = [devs]
            if not (isinstance(devs, list) and devs and all(isinstance(d, str) for d in devs)):
                raise InvalidInput(f"plan: task {tid!r} must map to a non-empty list of "
                                   f"device ids, got {devs!r}")
            assignments[TaskId(tid)] = tuple(DeviceId(d) for d in devs)
        codecs: dict[EdgeKey, str] = {}
        raw_codecs = doc.get("codecs") or {}
        if not isinstance(raw_codecs, Mapping):
            raise InvalidInput("plan: 'codecs' must map 'src->dst' to codec names")
        for key, name in raw_codecs.items():
            src, sep, dst = str(key).partition("->")
            if not sep or not src or not dst or not isinstance(name, str):
                raise InvalidInput(f"plan: codec key {key!r} must look like 'src->dst' "
                                   f"and map to a codec name")
            codecs[(TaskId(src), TaskId(dst))] = name
        order = doc.get("order")
        if order is not None and not (isinstance(order, list)
                                      and all(isinstance(t, str) for t in order)):
            raise InvalidInput("plan: 'order' must be a list of task ids")
        return cls(assignments, codecs, str(doc.get("policy", "")),
                   tuple(TaskId(t) for t in order) if order is not None else None,
                   decision_s=float(doc.get("decision_s", 0.0)),
                   simulator_calls=int(doc.get("simulator_calls", 0)))


def single(assign: Mapping[str, str] | Sequence[tuple[str, str]], policy: str = "") -> Plan:
    """A plan from task → one device (convenience for tests and tools)."""
    items = assign.items() if isinstance(assign, Mapping) else assign
    return Plan({TaskId(t): (DeviceId(d),) for t, d in items}, policy=policy)
