"""Extract a TaskGraph from a traceable torch module.

The module is traced with ``torch.fx``; every leaf module call (a ``Linear``, a ``Conv2d``,
or any module that declares ``edgeswarm_kind``, such as a whole attention block) starts a
task. Parameter-free glue that follows it (activations, pooling, reshapes, residual
adds, functional calls) is fused into the task that produced its latest input, so a
task is one layer-level group of operators. Each task gets the FLOPs measured by
``torch.utils.flop_counter`` while running the example inputs (plus one FLOP per output
element for elementwise work), its parameter bytes and its output activation bytes;
an edge carries the bytes of every activation that crosses from one task to another.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

_KIND_BY_TYPE: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.Linear, nn.Bilinear), "linear"),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d), "conv"),
    ((nn.MultiheadAttention,), "attention"),
    ((nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm), "norm"),
    ((nn.Embedding, nn.EmbeddingBag), "embedding"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
      nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), "pool"),
    ((nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax, nn.LeakyReLU,
      nn.Hardswish, nn.Mish), "activation"),
    ((nn.Flatten, nn.Unflatten, nn.Identity), "reshape"),
    ((nn.Dropout,), "elementwise"),
)
#: Kinds that run as one task per op but are fused into their producer when parameter-free.
_GLUE = {"activation", "reshape", "elementwise", "pool"}
#: Kinds a tensor-parallel split applies to (column/row-parallel, by heads, by channels).
_SPLITTABLE = {"linear", "conv", "attention", "mlp"}
_ELEMENTWISE_FLOPS = {"norm": 5.0, "activation": 1.0, "elementwise": 1.0, "pool": 1.0}


def kind_of(module: nn.Module) -> str:
    declared = getattr(module, "edgeswarm_kind", None)
    if isinstance(declared, str):
        return declared
    for types, kind in _KIND_BY_TYPE:
        if isinstance(module, types):
            return kind
    return "other"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return hasattr(m, "edgeswarm_kind") or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Group:
    id: str
    kind: str
    order: int
    flops: float = 0.0
    param_bytes: int = 0
    nodes: list[fx.Node] = field(default_factory=list)


@dataclass(frozen=True)
class Traced:
    """A traced module and its task graph: which fx nodes make up each task (the
    partitioner cuts the module along these groups)."""

    module: fx.GraphModule
    graph: TaskGraph
    #: the fx nodes of each task, in graph order (get_attr nodes belong to no task)
    nodes: Mapping[TaskId, tuple[fx.Node, ...]]


def extract(module: nn.Module, example_inputs: Sequence[Any], name: str = "") -> TaskGraph:
    """The TaskGraph of ``module`` for ``example_inputs`` (costs are for that batch)."""
    return trace(module, example_inputs, name).graph


def trace(module: nn.Module, example_inputs: Sequence[Any], name: str = "") -> Traced:
    """Trace ``module`` with ``example_inputs``: its task graph and the nodes of each task."""
    module = module.eval()
    try:
        graph = _Tracer().trace(module)
    except Exception as exc:
        raise InvalidInput(
            f"cannot trace {type(module).__name__} with torch.fx ({exc}); make its forward free "
            "of data-dependent Python control flow, or mark the block that has it as one task "
            "by giving its module class an `edgeswarm_kind` attribute") from exc
    gm = fx.GraphModule(module, graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(example_inputs) != len(placeholders):
        raise InvalidInput(f"{type(module).__name__} takes {len(placeholders)} input(s), "
                           f"got {len(example_inputs)} example input(s)")
    runner = _Recorder(gm)
    with torch.inference_mode():
        runner.run(*example_inputs)
    graph_, groups = _build(gm, runner, name or type(module).__name__)
    return Traced(gm, graph_, {TaskId(g.id): tuple(g.nodes) for g in groups})


class _Recorder(fx.Interpreter):
    """Runs the traced module node by node, recording output bytes and FLOPs per node."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.out_bytes: dict[fx.Node, int] = {}
        self.numel: dict[fx.Node, int] = {}
        self.flops: dict[fx.Node, float] = {}

    def run_node(self, n: fx.Node) -> Any:
        counter = FlopCounterMode(display=False)
        with counter:
            result = super().run_node(n)
        self.flops[n] = float(counter.get_total_flops())
        tensors = list(_tensors(result))
        self.out_bytes[n] = sum(t.numel() * t.element_size() for t in tensors)
        self.numel[n] = sum(t.numel() for t in tensors)
        return result


def _tensors(value: Any) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _build(gm: fx.GraphModule, rec: _Recorder, name: str) -> tuple[TaskGraph, list[_Group]]:
    group_of: dict[fx.Node, _Group] = {}
    groups: list[_Group] = []
    modules = dict(gm.named_modules())
    counted_params: set[int] = set()

    def new_group(gid: str, kind: str) -> _Group:
        g = _Group(gid, kind, len(groups))
        groups.append(g)
        return g

    def param_bytes(tensors: Iterable[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            if id(t) not in counted_params:  # tied weights count once
                counted_params.add(id(t))
                total += t.numel() * t.element_size()
        return total

    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        producers = [group_of[a] for a in node.all_input_nodes if a in group_of]
        latest = max(producers, key=lambda g: g.order) if producers else None
        extra = max(rec.flops.get(node, 0.0), 0.0)
        if node.op == "placeholder":
            group = new_group(f"input:{node.target}", "input")
        elif node.op == "call_module":
            sub = modules[str(node.target)]
            kind = kind_of(sub)
            own = list(sub.parameters()) + list(sub.buffers())
            if latest is not None and _fuses_into(sub, kind, bool(own), latest.kind):
                group = latest
                group.param_bytes += param_bytes(own)
            else:
                group = new_group(str(node.target), kind)
                group.param_bytes += param_bytes(own)
            extra += _ELEMENTWISE_FLOPS.get(kind, 0.0) * rec.numel.get(node, 0) \
                if extra == 0 else 0.0
        elif node.op == "get_attr":
            group_of[node] = _Group("", "param", -1)  # resolved at the consumer
            continue
        else:  # call_function / call_method: glue, fused into its latest producer
            if latest is None or (latest.kind == "input" and rec.flops.get(node, 0) > 0):
                group = new_group(node.name, _function_kind(node))
            else:
                group = latest
            if extra == 0:
                extra = float(rec.numel.get(node, 0))
            attrs = [a for a in node.all_input_nodes if a.op == "get_attr"]
            group.param_bytes += param_bytes(
                t for a in attrs for t in _tensors(_fetch_attr(gm, str(a.target))))
        group.flops += extra
        group.nodes.append(node)
        group_of[node] = group

    return _to_taskgraph(gm, groups, group_of, rec, name), groups


def _to_taskgraph(gm: fx.GraphModule, groups: list[_Group], group_of: dict[fx.Node, _Group],
                  rec: _Recorder, name: str) -> TaskGraph:
    edge_bytes: dict[tuple[str, str], int] = {}
    seen: set[tuple[fx.Node, str]] = set()  # an activation crosses to a task once
    exported: dict[str, set[fx.Node]] = {g.id: set() for g in groups}
    for node in gm.graph.nodes:
        for src in node.all_input_nodes:
            g_src = group_of.get(src)
            if g_src is None or g_src.order < 0:
                continue
            if node.op == "output":
                exported[g_src.id].add(src)
                continue
            g_dst = group_of[node]
            if g_dst is g_src:
                continue
            exported[g_src.id].add(src)
            if (src, g_dst.id) in seen:
                continue
            seen.add((src, g_dst.id))
            key = (g_src.id, g_dst.id)
            edge_bytes.setdefault(key, 0)
            edge_bytes[key] += rec.out_bytes.get(src, 0)
    tasks = []
    for g in groups:
        out = sum(rec.out_bytes.get(n, 0) for n in exported[g.id])
        if not exported[g.id] and g.nodes:
            out = rec.out_bytes.get(g.nodes[-1], 0)
        tasks.append(Task(id=TaskId(g.id), flops=float(g.flops), param_bytes=int(g.param_bytes),
                          out_bytes=int(out), kind=g.kind, splittable=g.kind in _SPLITTABLE))
    edges = tuple(Edge(TaskId(s), TaskId(d), b) for (s, d), b in edge_bytes.items())
    return TaskGraph(tasks=tuple(tasks), edges=edges, name=name)


def _fuses_into(sub: nn.Module, kind: str, has_params: bool, producer_kind: str) -> bool:
    """Glue joins the task before it; so does a BatchNorm after a conv (it folds into it)."""
    if producer_kind == "input":
        return False
    if kind in _GLUE and not has_params:
        return True
    return isinstance(sub, nn.modules.batchnorm._BatchNorm) and producer_kind == "conv"


def _function_kind(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    if "attention" in target:
        return "attention"
    if target in ("matmul", "bmm", "linear", "mm", "einsum"):
        return "linear"
    return "elementwise"


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
