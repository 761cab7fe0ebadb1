"""TaskGraph: the model as the planner sees it.

A task is a layer-level group of operators with its cost (FLOPs, parameter bytes,
output activation bytes); an edge carries the bytes of the activation that flows from
one task to the next. Pure data: it serializes to the JSON interchange format
``edgeswarm.taskgraph/1`` and back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NewType

from edgeswarm.placement.errors import InvalidInput

TaskId = NewType("TaskId", str)

FORMAT = "edgeswarm.taskgraph/1"

#: Kinds the extractor emits; other strings are accepted from JSON.
KINDS = ("input", "linear", "conv", "attention", "mlp", "norm", "embedding", "pool",
         "activation", "elementwise", "reshape", "output", "other")


@dataclass(frozen=True)
class Task:
    id: TaskId
    flops: float
    param_bytes: int
    out_bytes: int
    kind: str = "other"
    splittable: bool = False
    devices: tuple[str, ...] | None = None
    compute_s: Mapping[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "flops": self.flops, "param_bytes": self.param_bytes,
            "out_bytes": self.out_bytes, "kind": self.kind, "splittable": self.splittable,
        }
        if self.devices is not None:
            out["devices"] = list(self.devices)
        if self.compute_s is not None:
            out["compute_s"] = dict(self.compute_s)
        return out


@dataclass(frozen=True)
class Edge:
    src: TaskId
    dst: TaskId
    bytes: int


@dataclass(frozen=True)
class TaskGraph:
    tasks: tuple[Task, ...]
    edges: tuple[Edge, ...]
    name: str = ""
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [t.id for t in self.tasks]
        seen: set[str] = set()
        for tid in ids:
            if tid in seen:
                raise InvalidInput(f"task graph: task id {tid!r} appears twice; ids must be unique")
            seen.add(tid)
        for e in self.edges:
            for end in (e.src, e.dst):
                if end not in seen:
                    raise InvalidInput(
                        f"task graph: edge {e.src}->{e.dst} names unknown task {end!r}")
            if e.bytes < 0:
                raise InvalidInput(f"task graph: edge {e.src}->{e.dst} has negative bytes")
        self._index.update({tid: i for i, tid in enumerate(ids)})
        self.topological_order()  # raises on a cycle

    # -- queries -----------------------------------------------------------------
    def task(self, tid: str) -> Task:
        try:
            return self.tasks[self._index[tid]]
        except KeyError:
            raise InvalidInput(f"task graph: no task {tid!r}") from None

    def successors(self, tid: str) -> list[Edge]:
        return [e for e in self.edges if e.src == tid]

    def predecessors(self, tid: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == tid]

    @property
    def total_flops(self) -> float:
        return sum(t.flops for t in self.tasks)

    @property
    def total_param_bytes(self) -> int:
        return sum(t.param_bytes for t in self.tasks)

    def topological_order(self) -> list[TaskId]:
        indegree = {t.id: 0 for t in self.tasks}
        for e in self.edges:
            indegree[e.dst] += 1
        ready = [t.id for t in self.tasks if indegree[t.id] == 0]
        order: list[TaskId] = []
        while ready:
            tid = ready.pop(0)
            order.append(tid)
            for e in self.successors(tid):
                indegree[e.dst] -= 1
                if indegree[e.dst] == 0:
                    ready.append(e.dst)
        if len(order) != len(self.tasks):
            stuck = sorted(t for t, d in indegree.items() if d > 0)
            raise InvalidInput(f"task graph: edges form a cycle through {stuck[:5]}")
        return order

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "tasks": [t.to_json() for t in self.tasks],
            "edges": [{"src": e.src, "dst": e.dst, "bytes": e.bytes} for e in self.edges],
        }
        if self.name:
            out["name"] = self.name
        return out

    def dumps(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json(), indent=indent)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | str) -> TaskGraph:
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"task graph: not JSON ({exc})") from None
        if not isinstance(doc, Mapping):
            raise InvalidInput("task graph: expected a JSON object")
        if doc.get("format") != FORMAT:
            raise InvalidInput(
                f"task graph: format is {doc.get('format')!r}, expected {FORMAT!r}")
        tasks = tuple(_task_from_json(t) for t in _list(doc, "tasks"))
        edges = tuple(_edge_from_json(e) for e in _list(doc, "edges"))
        return cls(tasks=tasks, edges=edges, name=str(doc.get("name", "")))


def _list(doc: Mapping[str, Any], key: str) -> Iterable[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise InvalidInput(f"task graph: {key!r} must be a list")
    return value


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise InvalidInput(f"task graph: {where} lacks required field {key!r}")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidInput(f"task graph: {where}.{key} must be {kind.__name__}, got {value!r}")
    return value


def _task_from_json(obj: Any) -> Task:
    if not isinstance(obj, Mapping):
        raise InvalidInput("task graph: each task must be an object")
    where = f"task {obj.get('id', '?')!r}"
    devices = obj.get("devices")
    compute_s = obj.get("compute_s")
    if devices is not None and not (
            isinstance(devices, list) and all(isinstance(d, str) for d in devices)):
        raise InvalidInput(f"task graph: {where}.devices must be a list of device ids")
    if compute_s is not None and not (
            isinstance(compute_s, Mapping)
            and all(isinstance(v, (int, float)) and v >= 0 for v in compute_s.values())):
        raise InvalidInput(f"task graph: {where}.compute_s must map device ids to seconds >= 0")
    task = Task(
        id=TaskId(_field(obj, "id", str, where)),
        flops=_field(obj, "flops", float, where),
        param_bytes=_field(obj, "param_bytes", int, where),
        out_bytes=_field(obj, "out_bytes", int, where),
        kind=str(obj.get("kind", "other")),
        splittable=bool(obj.get("splittable", False)),
        devices=tuple(devices) if devices is not None else None,
        compute_s={str(k): float(v) for k, v in compute_s.items()} if compute_s else None,
    )
    if task.flops < 0 or task.param_bytes < 0 or task.out_bytes < 0:
        raise InvalidInput(f"task graph: {where} has a negative cost")
    return task


def _edge_from_json(obj: Any) -> Edge:
    if not isinstance(obj, Mapping):
        raise InvalidInput("task graph: each edge must be an object")
    where = f"edge {obj.get('src', '?')}->{obj.get('dst', '?')}"
    return Edge(src=TaskId(_field(obj, "src", str, where)),
                dst=TaskId(_field(obj, "dst", str, where)),
                bytes=_field(obj, "bytes", int, where))
