"""A task graph from an ONNX file: its nodes grouped into tasks, costed from inferred shapes.

A torch model is traced (:mod:`edgeswarm.models.graph`); an ONNX file already is a graph,
its nodes in topological order. Walking them, every node that does a layer's heavy work
(:data:`COMPUTE`: MatMul, Gemm, Conv, attention, a normalization, an embedding lookup)
starts a task; the trivially cheap nodes after it (activations, pooling, reshapes, a
residual Add, a BatchNormalization right after a Conv) join the task of their latest
producer, as glue does in the torch extraction, so both give the planner layer-level tasks
(and the same tasks for a model and its export). Each model input is a task of kind
``input``. Nodes that compute from weights only (``Constant``, a Reshape's target shape)
belong to no task: every stage that needs one gets its own copy, as it gets the
initializers it reads.

Costs are those of the example inputs' batch (:mod:`edgeswarm.models.onnx_costs`): shapes
come from ONNX shape inference with the inputs' dimensions fixed to the examples' (and, for
any tensor it leaves open, from one ONNX Runtime run of the file that returns it); FLOPs
are counted as the torch extraction counts them. An edge carries the bytes of every tensor
that crosses from one task to another.

:func:`trace` gives an :class:`OnnxTraced`, a :class:`~edgeswarm.models.graph.Traced` whose
``module`` runs the whole file in ONNX Runtime; :mod:`edgeswarm.models.onnx_partition`
cuts the file by a plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import fx, nn

from edgeswarm.models.graph import Traced
from edgeswarm.models.onnx_costs import Shape, inferred_shapes, nbytes, node_flops
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable
from edgeswarm.placement.taskgraph import Edge, Task, TaskGraph, TaskId

if TYPE_CHECKING:
    import onnx

#: Operators that start a task, by the task kind they give it.
COMPUTE: Mapping[str, str] = {
    **dict.fromkeys(("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "FusedMatMul",
                     "MatMulNBits", "Einsum"), "linear"),
    **dict.fromkeys(("Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv"),
                    "conv"),
    **dict.fromkeys(("Attention", "MultiHeadAttention", "GroupQueryAttention"), "attention"),
    **dict.fromkeys(("LayerNormalization", "SimplifiedLayerNormalization",
                     "SkipLayerNormalization", "RMSNormalization", "GroupNormalization",
                     "InstanceNormalization", "BatchNormalization"), "norm"),
    **dict.fromkeys(("LSTM", "GRU", "RNN"), "other"),
}
_GLUE_KINDS: Mapping[str, str] = {
    **dict.fromkeys(("Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "Tanh", "Gelu",
                     "FastGelu", "Softmax", "LogSoftmax", "Elu", "Selu", "Softplus", "Mish",
                     "HardSwish", "Clip", "Erf"), "activation"),
    **dict.fromkeys(("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                     "LpPool"), "pool"),
    **dict.fromkeys(("Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat",
                     "Split", "Slice", "Shape", "Size", "Identity", "Expand", "Cast",
                     "Dropout", "Gather", "Tile"), "reshape"),
}
#: Operators with subgraphs: the cut works on the top-level graph only.
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
#: Operators with no inputs that must not be copied into several stages.
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"})


class OnnxModule(nn.Module):
    """An ONNX model run by ONNX Runtime, called like a torch module: torch tensors (or
    numpy arrays) in, a tuple of torch tensors out (the single tensor with ``single``).
    The session is made on the first call, unless one is given."""

    def __init__(self, model: bytes, single: bool = False, sess: Any = None) -> None:
        super().__init__()
        self.model = model
        self.single = single
        self._session: Any = sess

    def forward(self, *inputs: Any) -> Any:
        if self._session is None:
            self._session = session(self.model, "the model")
        names = [i.name for i in self._session.get_inputs()]
        if len(inputs) != len(names):
            raise InvalidInput(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), "
                               f"got {len(inputs)}")
        feed = {n: _numpy(x) for n, x in zip(names, inputs, strict=True)}
        outs = tuple(torch.from_numpy(np.asarray(o)) for o in self._session.run(None, feed))
        return outs[0] if self.single and len(outs) == 1 else outs


def as_graph_module(runner: nn.Module, input_names: Sequence[str]) -> fx.GraphModule:
    """``runner`` as a one-node fx.GraphModule taking ``input_names`` (what the partitioner's
    stages are, so that an ONNX stage runs wherever a torch stage does)."""
    root = nn.Module()
    root.add_module("onnx", runner)
    g = fx.Graph()
    args = tuple(g.placeholder(_identifier(n)) for n in input_names)
    g.output(g.call_module("onnx", args))
    return fx.GraphModule(root, g)


@dataclass(frozen=True)
class OnnxTraced(Traced):
    """An ONNX file ready to place and cut. ``module`` runs the whole file (ONNX Runtime),
    ``graph`` is its task graph, ``nodes`` is empty (there are no fx nodes): the ONNX nodes
    of each task are ``onnx_nodes`` (indices into ``model.graph.node``)."""

    #: the file with shapes inferred (its own dimensions kept: a free batch stays free)
    model: onnx.ModelProto
    onnx_nodes: Mapping[TaskId, tuple[int, ...]]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    #: every tensor computed from the inputs (not from weights alone), with its element
    #: type (an onnx ``TensorProto`` enum) and dimensions at the example batch: what may
    #: cross from one stage to another
    dynamic: Mapping[str, Shape]


def load(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; ModelFileError saying what is wrong with it."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
        if not model.graph.node:
            raise ValueError("the file holds no graph nodes")
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path} is not a valid ONNX model ({_first_line(exc)}); export "
                             f"it again (e.g. 'edgeswarm compile MODEL --runtime onnx -o "
                             f"FILE')") from None
    flow = sorted({n.op_type for n in model.graph.node if n.op_type in CONTROL_FLOW})
    if flow:
        raise ModelFileError(f"{path} uses control flow ({', '.join(flow)}), whose subgraphs "
                             f"cannot be cut across devices; run the file on one device "
                             f"with es.compile, or export the model without it")
    return model


def trace(path: str | Path, example_inputs: Sequence[Any] | None = None,
          name: str = "") -> OnnxTraced:
    """The ONNX file at ``path`` with its task graph, costed for ``example_inputs``
    (batch-first arrays or tensors; default: one example with every free dimension 1)."""
    onnx = _onnx()
    path = Path(path)
    model = load(path)
    raw = model.SerializeToString()
    sess = session(raw, str(path))   # ONNX Runtime runs it, or the error says why not
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = tuple(o.name for o in model.graph.output)
    examples = _examples(inputs, example_inputs, path)
    try:
        symbolic = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # best effort: the cut types what inference leaves out
        symbolic = model
    fed = {i.name: x for i, x in zip(inputs, examples, strict=True)}
    shapes = inferred_shapes(model, {n: tuple(x.shape) for n, x in fed.items()})
    unknown = [o for n in model.graph.node for o in n.output if o and o not in shapes]
    if unknown:   # what inference leaves open (a data-dependent size), one run tells
        shapes.update(_run_for(model, unknown, fed))
    const = _weights_only(model)
    graph, nodes = _tasks(model, [i.name for i in inputs], outputs, shapes, const,
                          name or path.stem)
    dynamic = {i.name: shapes[i.name] for i in inputs}
    for node in model.graph.node:
        if not all(o in const for o in node.output if o):
            dynamic.update({o: shapes[o] for o in node.output if o})
    module = as_graph_module(OnnxModule(raw, single=len(outputs) == 1, sess=sess),
                             [i.name for i in inputs])
    return OnnxTraced(module, graph, {}, symbolic, nodes, tuple(i.name for i in inputs),
                      outputs, examples, dynamic)


def session(model: bytes, what: str) -> Any:
    """An ONNX Runtime CPU session; ModelFileError when ONNX Runtime cannot run the model."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeNotAvailable("placing an ONNX file needs ONNX Runtime: pip install "
                                  "'edgeswarm[onnx]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"ONNX Runtime cannot run {what} ({_first_line(exc)}); check "
                             f"its operators and opset") from None


# -- examples and shapes ----------------------------------------------------------------
def _examples(inputs: Sequence[Any], given: Sequence[Any] | None, path: Path
              ) -> tuple[torch.Tensor, ...]:
    """The example inputs as tensors of the file's types; made up where none are given
    (free dimensions 1, normal floats, zero integers)."""
    onnx = _onnx()
    if given is not None and len(given) != len(inputs):
        raise InvalidInput(f"{path.name} takes {len(inputs)} input(s) "
                           f"({', '.join(i.name for i in inputs)}), got {len(given)} example "
                           f"input(s)")
    rng = np.random.default_rng(0)
    out = []
    for k, info in enumerate(inputs):
        t = info.type.tensor_type
        if not info.type.HasField("tensor_type") or not t.HasField("shape"):
            raise ModelFileError(f"{path.name}: input {info.name!r} is not a tensor of known "
                                 f"rank; only tensor inputs can be placed")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if given is None:
            shape = tuple(1 if d is None else d for d in dims)
            x = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                 else np.zeros(shape, dtype))
        else:
            x = _numpy(given[k])
            if x.dtype != dtype or x.ndim != len(dims) or any(
                    d is not None and d != s for d, s in zip(dims, x.shape, strict=True)):
                want = ", ".join("N" if d is None else str(d) for d in dims)
                raise InvalidInput(f"example input {k} of {path.name} ({info.name!r}) is "
                                   f"{x.dtype} {tuple(x.shape)}, expected {dtype} ({want}) "
                                   f"(N: any size)")
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return tuple(out)


def _run_for(model: onnx.ModelProto, names: Sequence[str],
             inputs: Mapping[str, torch.Tensor]) -> dict[str, Shape]:
    """Run the model once, returning ``names`` as extra outputs, for their real shapes."""
    onnx = _onnx()
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in have)
    sess = session(probe.SerializeToString(), "the model with its intermediate tensors")
    outs = sess.run(list(names), {k: _numpy(v) for k, v in inputs.items()})
    result: dict[str, Shape] = {}
    for n, value in zip(names, outs, strict=True):
        a = np.asarray(value)
        result[n] = (onnx.helper.np_dtype_to_tensor_dtype(a.dtype), tuple(a.shape))
    return result


# -- tasks -------------------------------------------------------------------------------
@dataclass
class _Group:
    id: str
    kind: str
    order: int
    flops: float = 0.0
    param_bytes: int = 0
    nodes: list[int] = field(default_factory=list)


def _weights_only(model: onnx.ModelProto) -> set[str]:
    """The tensors computed from initializers alone (and the initializers)."""
    const = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in _RANDOM and all(i in const for i in node.input if i):
            const.update(o for o in node.output if o)
    return const


def _tasks(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str],
           shapes: Mapping[str, Shape], const: set[str], name: str
           ) -> tuple[TaskGraph, dict[TaskId, tuple[int, ...]]]:
    groups: list[_Group] = []
    group_of: dict[str, _Group] = {}     # tensor -> the task that makes it
    counted: set[str] = set()            # weights counted once, however many nodes read them
    ids: set[str] = set()

    def new_group(gid: str, kind: str) -> _Group:
        base, k = gid, 1
        while gid in ids:
            k += 1
            gid = f"{base}#{k}"
        ids.add(gid)
        g = _Group(gid, kind, len(groups))
        groups.append(g)
        return g

    for x in inputs:
        group_of[x] = new_group(f"input:{x}", "input")
    for index, node in enumerate(model.graph.node):
        if all(o in const for o in node.output if o):
            continue   # computes from weights only: copied into the stages that need it
        producers = [group_of[i] for i in node.input if i in group_of]
        latest = max(producers, key=lambda g: g.order) if producers else None
        kind = _kind(node, const)
        starts = (node.op_type in COMPUTE or kind == "embedding") and not (
            node.op_type == "BatchNormalization" and latest is not None
            and latest.kind == "conv")   # folds into the conv, as in the torch extraction
        if starts or latest is None or latest.kind == "input":
            group = new_group(node.name or f"{node.op_type}_{index}", kind)
        else:
            group = latest
        group.flops += node_flops(node, kind, shapes)
        for i in node.input:
            if i in const and i not in counted and i in shapes:
                counted.add(i)
                group.param_bytes += nbytes(shapes[i])
        group.nodes.append(index)
        for o in node.output:
            if o:
                group_of[o] = group
    return _graph(model, groups, group_of, outputs, shapes, name), {
        TaskId(g.id): tuple(g.nodes) for g in groups}


def _graph(model: onnx.ModelProto, groups: Sequence[_Group], group_of: Mapping[str, _Group],
           outputs: Sequence[str], shapes: Mapping[str, Shape], name: str) -> TaskGraph:
    edge_bytes: dict[tuple[str, str], int] = {}
    seen: set[tuple[str, str]] = set()           # a tensor crosses to a task once
    leaving: dict[str, set[str]] = {g.id: set() for g in groups}
    for o in outputs:
        if o in group_of:
            leaving[group_of[o].id].add(o)
    for node in model.graph.node:
        dst = next((group_of[o] for o in node.output if o in group_of), None)
        if dst is None:
            continue
        for i in node.input:
            src = group_of.get(i)
            if src is None or src is dst:
                continue
            leaving[src.id].add(i)
            if (i, dst.id) not in seen:
                seen.add((i, dst.id))
                edge_bytes[src.id, dst.id] = edge_bytes.get((src.id, dst.id), 0) + \
                    nbytes(shapes[i])
    tasks = []
    for g in groups:
        out = sum(nbytes(shapes[t]) for t in leaving[g.id])
        if not leaving[g.id] and g.nodes:
            last = [o for o in model.graph.node[g.nodes[-1]].output if o]
            out = nbytes(shapes[last[0]]) if last else 0
        tasks.append(Task(TaskId(g.id), float(g.flops), int(g.param_bytes), int(out), g.kind,
                          splittable=g.kind in ("linear", "conv", "attention")))
    edges = tuple(Edge(TaskId(s), TaskId(d), b) for (s, d), b in edge_bytes.items())
    return TaskGraph(tuple(tasks), edges, name)


def _kind(node: onnx.NodeProto, const: set[str]) -> str:
    if node.op_type in COMPUTE:
        return COMPUTE[node.op_type]
    if node.op_type == "Gather" and node.input and node.input[0] in const:
        return "embedding"   # a lookup in a weight table
    return _GLUE_KINDS.get(node.op_type, "elementwise")


# -- small helpers -----------------------------------------------------------------------
def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise RuntimeNotAvailable("placing an ONNX file needs the onnx package: pip install "
                                  "onnx") from None
    return onnx


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x))


def _identifier(name: str) -> str:
    out = "".join(c if c.isalnum() else "_" for c in name)
    return out if out and not out[0].isdigit() else f"_{out}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
