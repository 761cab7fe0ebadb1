"""Cutting an ONNX file by a plan into per-stage ONNX files.

The ONNX twin of :func:`edgeswarm.models.partition.partition`, with the same pipeline
rules: walking the tasks of the file's task graph (:mod:`edgeswarm.models.onnx_graph`) in
order, consecutive tasks on one device form a stage; a stage receives the tensors that it
or a later stage still needs (its carry) and sends on what the stages after it need, so a
tensor that skips a stage (a residual) rides along with it.

Each stage's file is cut from the whole file by tensor names with
:class:`onnx.utils.Extractor`: the nodes between the stage's input and output tensors, with
the weights they read and the weights-only nodes (``Constant``, shape computations) that
feed them. Every node of the file therefore runs in exactly one stage (weights-only nodes
in every stage that needs them), on ONNX Runtime's kernels: running the stages one after
another gives what ONNX Runtime gives for the whole file, bitwise where ONNX Runtime fuses
no operators across a cut (the zoo's CNNs), else to float rounding (5e-7 on a small
transformer cut in five). The stages' dimensions are the file's own (a free batch
dimension stays free).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import onnx
import onnx.utils
from torch.utils import _pytree as pytree

from edgeswarm.models.onnx_graph import OnnxModule, OnnxTraced, as_graph_module
from edgeswarm.models.partition import Partition, Stage, device_runs
from edgeswarm.placement.cluster import DeviceId
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.taskgraph import TaskId


@dataclass(frozen=True)
class OnnxStage(Stage):
    """A stage cut from an ONNX file: ``onnx_model`` is its file's bytes, ``module`` runs
    it in ONNX Runtime."""

    onnx_model: bytes = b""

    #: an ONNX stage is already ONNX: fp32 as it is, or quantized from it
    runtimes: ClassVar[tuple[str, ...]] = ("onnx", "onnx-int8")

    def write_onnx(self, inputs: Sequence[Any], path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_model)
        return path


def cut(traced: OnnxTraced, plan: Plan) -> Partition:
    """Cut the file of ``traced`` into the stages of ``plan`` (see the module doc).

    Raises :class:`InvalidInput` naming the task when the plan leaves a task out or puts
    one on several devices.
    """
    model = traced.model
    nodes = model.graph.node
    runs = _runs(traced, plan)
    outputs = list(dict.fromkeys(traced.output_names))
    computed = [o for o in outputs if o not in traced.dynamic]
    if computed:
        raise InvalidInput(f"the model returns {', '.join(computed)}, computed from weights "
                           f"alone; every output must be computed from the inputs")
    stage_of = {i: k for k, (_, _, idx) in enumerate(runs) for i in idx}
    last_use: dict[str, int] = dict.fromkeys(outputs, len(runs))  # len(runs): the caller
    for i, node in enumerate(nodes):
        if i in stage_of:
            for t in node.input:
                if t in traced.dynamic:
                    last_use[t] = max(last_use.get(t, -1), stage_of[i])
    # every tensor the inputs flow into, in the order it is made
    ordered = [*traced.input_names, *(o for n in nodes for o in n.output if o in traced.dynamic)]
    extractor = onnx.utils.Extractor(_typed(model, traced))
    node_at = {tuple(n.output): i for i, n in enumerate(nodes)}
    carry: list[str] = list(traced.input_names)
    stages = []
    for k, (device, tasks, idx) in enumerate(runs):
        made = {o for i in idx for o in nodes[i].output}
        if k == len(runs) - 1:
            out = outputs
        else:
            out = [t for t in ordered if last_use.get(t, -1) > k and (t in made or t in carry)]
        part = extractor.extract_model(list(carry), list(out))
        _check_cut(part, traced, node_at, set(idx), f"stage {k} ({', '.join(tasks)})")
        raw = part.SerializeToString()
        stages.append(OnnxStage(k, device, tasks,
                                as_graph_module(OnnxModule(raw), carry), tuple(carry),
                                tuple(out), onnx_model=raw))
        carry = list(out)
    spec = pytree.tree_flatten(0 if len(traced.output_names) == 1
                               else tuple(traced.output_names))[1]
    index = tuple(outputs.index(o) for o in traced.output_names)
    return Partition(tuple(stages), traced.input_names, spec, index)


def _runs(traced: OnnxTraced, plan: Plan) -> list[tuple[DeviceId, tuple[TaskId, ...],
                                                        list[int]]]:
    """Consecutive tasks (in graph order) on one device, with their ONNX node indices
    (input tasks have none: the model's inputs come from the coordinator)."""
    runs = device_runs(traced.graph, plan, lambda task: list(traced.onnx_nodes.get(task, ())))
    return [(d, t, sorted(n)) for d, t, n in runs]


def _typed(model: onnx.ModelProto, traced: OnnxTraced) -> onnx.ModelProto:
    """``model`` with a type for every tensor that may cross stages (the Extractor needs
    one for each input and output it is given): shape inference's, else the element type
    and rank it had at the example batch, every dimension free."""
    g = model.graph
    have = {v.name for v in (*g.input, *g.value_info, *g.output)}
    missing = [t for t in traced.dynamic if t not in have]
    if not missing:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in missing:
        elem, dims = traced.dynamic[t]
        out.graph.value_info.append(
            onnx.helper.make_tensor_value_info(t, elem, [None] * len(dims)))
    return out


def _check_cut(part: onnx.ModelProto, traced: OnnxTraced,
               node_at: dict[tuple[str, ...], int], own: set[int], stage: str) -> None:
    """Every node the Extractor took is this stage's own or computes from weights only
    (a node of another stage here would run twice, or miss its inputs)."""
    for node in part.graph.node:
        if node_at[tuple(node.output)] not in own and any(o in traced.dynamic
                                                        for o in node.output):
            raise InvalidInput(f"{stage} would run {node.op_type} node "
                               f"{node.name or node.output[0]!r} of another stage; is the "
                               f"file's graph in topological order?")
