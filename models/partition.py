"""Cutting a model by a plan into per-device stages, and exporting each stage.

A plan puts every task of the model's task graph (:func:`edgeswarm.models.graph.trace`)
on a device. Walking the tasks in graph order, consecutive tasks on the same device form
a *stage*; the model becomes a pipeline ``s1 -> s2 -> ... -> sk`` that the coordinator
feeds with the model's inputs and reads the outputs from. A stage receives the values
that it or any later stage still needs (its *carry*) and sends on what the stages after
it need, so an activation that skips a stage (a residual) rides along with it. A device
may hold several stages (a plan that goes a -> b -> a).

Each stage is an ``fx.GraphModule`` built from the traced module's own nodes, so running
the stages one after another performs exactly the operations of the whole model: the
result is bitwise equal in fp32. :func:`export` writes each stage as an artifact for its
device's runtime (ONNX fp32 or int8, LiteRT int8), calibrating int8 stages on the
activations the earlier stages produce from real calibration data.

Tensor-parallel groups (a task on several devices) are cut by
:mod:`edgeswarm.models.tensor_parallel`; here a task must have one device.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from edgeswarm.models.graph import Traced, trace
from edgeswarm.placement.cluster import DeviceId
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.taskgraph import TaskGraph, TaskId

N = TypeVar("N")  # one operation of a stage: an fx node, an ONNX node's index

log = logging.getLogger("edgeswarm.models.partition")


@dataclass(frozen=True)
class Stage:
    """One contiguous run of tasks on one device."""

    index: int
    device: DeviceId
    tasks: tuple[TaskId, ...]
    #: ``forward(*inputs) -> tuple(outputs)``
    module: fx.GraphModule
    #: names of the values it receives, in order (the first stage: the model's inputs)
    inputs: tuple[str, ...]
    #: names of the values it sends on (the last stage: the model's outputs)
    outputs: tuple[str, ...]
    #: what sets its weights apart from the model's own ("": they are the model's; e.g.
    #: the tail fine-tuned for a learned codec), so exported files are told apart
    variant: str = ""

    #: the shard runtimes :func:`export` can write this stage for
    runtimes: ClassVar[tuple[str, ...]] = ("onnx", "onnx-int8", "tflite-int8")

    def write_onnx(self, inputs: Sequence[torch.Tensor], path: Path) -> Path:
        """This stage as an fp32 ONNX file (``inputs``: an example of what it receives).
        A stage cut from an ONNX file (:mod:`edgeswarm.models.onnx_partition`) writes its
        own bytes."""
        return export_stage_onnx(self, inputs, path)


@dataclass(frozen=True)
class Partition:
    """A model cut into a pipeline of stages."""

    stages: tuple[Stage, ...]
    #: the model's input names (fx placeholder names), in call order
    input_names: tuple[str, ...]
    #: how the last stage's outputs are put back into the model's output structure
    output_spec: pytree.TreeSpec
    #: for each leaf of the model's output, its index among the last stage's outputs
    output_index: tuple[int, ...]

    @property
    def devices(self) -> tuple[DeviceId, ...]:
        """The devices in pipeline order (a device may appear more than once)."""
        return tuple(s.device for s in self.stages)

    def assemble(self, outputs: Sequence[Any]) -> Any:
        """The model's output structure from the last stage's outputs."""
        return pytree.tree_unflatten([outputs[i] for i in self.output_index],
                                     self.output_spec)

    def run(self, *inputs: Any) -> Any:
        """Run the stages one after another in torch (a check; devices do this for real)."""
        values: Sequence[Any] = inputs
        with torch.inference_mode():
            for stage in self.stages:
                values = stage.module(*values)
        return self.assemble(values)

    def stage_inputs(self, *inputs: Any) -> list[tuple[torch.Tensor, ...]]:
        """The inputs each stage receives when the model is run on ``inputs``."""
        out: list[tuple[torch.Tensor, ...]] = []
        values: tuple[Any, ...] = tuple(inputs)
        with torch.inference_mode():
            for stage in self.stages:
                out.append(values)
                values = tuple(stage.module(*values))
        return out


def partition(module: nn.Module, example_inputs: Sequence[Any], plan: Plan,
              traced: Traced | None = None) -> Partition:
    """Cut ``module`` (traced with ``example_inputs``) into the stages of ``plan``.

    Raises :class:`InvalidInput` naming the task when the plan leaves a task out, puts
    one on several devices, or cuts where a non-tensor value (a shape, a Python number)
    would have to cross devices.
    """
    from edgeswarm.models.onnx_graph import OnnxTraced

    if isinstance(traced, OnnxTraced):  # an ONNX file: cut by tensor names
        from edgeswarm.models.onnx_partition import cut

        return cut(traced, plan)
    traced = traced or trace(module, example_inputs)
    gm = traced.module
    runs = _runs(traced, plan)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(output.args[0])
    if not all(isinstance(leaf, fx.Node) for leaf in leaves):
        raise InvalidInput("the model returns a constant; every output must be computed")
    stage_of: dict[fx.Node, int] = {}
    for k, (_, _, nodes) in enumerate(runs):
        for n in nodes:
            stage_of[n] = k
    # last stage that reads each value (len(runs): the model's output reads it)
    last_use: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            for leaf in leaves:
                last_use[leaf] = len(runs)
            continue
        at = stage_of.get(n)
        if at is None:
            continue
        for a in n.all_input_nodes:
            last_use[a] = max(last_use.get(a, -1), at)
    ordered = [n for n in gm.graph.nodes if n.op != "output"]
    carry: list[fx.Node] = list(placeholders)
    stages = []
    examples = _example_values(gm, example_inputs)
    for k, (device, tasks, nodes) in enumerate(runs):
        made = set(nodes)
        if k == len(runs) - 1:
            out = list(dict.fromkeys(leaves))
        else:
            out = [n for n in ordered if last_use.get(n, -1) > k
                   and (n in made or n in carry) and n.op != "get_attr"]
        for n in out:
            if not isinstance(examples.get(n), torch.Tensor):
                raise InvalidInput(
                    f"cannot cut the model after task {tasks[-1]!r}: value {n.name!r} "
                    f"({type(examples.get(n)).__name__}) would cross from device {device!r} "
                    f"to the next, and only tensors travel; keep the tasks that compute and "
                    f"use it on one device")
        stages.append(Stage(k, device, tasks, _stage_module(gm, carry, nodes, out),
                            tuple(n.name for n in carry), tuple(n.name for n in out)))
        carry = out
    last = stages[-1].outputs
    index = tuple(last.index(leaf.name) for leaf in leaves)
    return Partition(tuple(stages), tuple(n.name for n in placeholders), spec, index)


def _runs(traced: Traced, plan: Plan) -> list[tuple[DeviceId, tuple[TaskId, ...], list[fx.Node]]]:
    """Consecutive tasks (in graph order) on one device, with their nodes (placeholders
    excluded: the model's inputs come from the coordinator)."""
    return device_runs(traced.graph, plan, lambda task: [
        n for n in traced.nodes[task] if n.op != "placeholder"])


def device_runs(graph: TaskGraph, plan: Plan, ops: Callable[[TaskId], list[N]]
                ) -> list[tuple[DeviceId, tuple[TaskId, ...], list[N]]]:
    """Consecutive tasks of ``graph`` (in its order) on one device, with their operations
    (``ops(task)``; a task with none, a model input, is skipped): the stages a layer-cut
    plan makes, for a traced torch module or an ONNX file alike."""
    runs: list[tuple[DeviceId, list[TaskId], list[N]]] = []
    for task in graph.tasks:
        devices = plan.assignments.get(task.id)
        if not devices:
            raise InvalidInput(f"the plan does not place task {task.id!r}; plan the model's "
                               f"own task graph ({graph.name})")
        if len(devices) > 1:
            raise InvalidInput(f"task {task.id!r} is on a tensor-parallel group "
                               f"{list(devices)}; layer cuts need one device per task")
        nodes = ops(task.id)
        if not nodes:
            continue
        if runs and runs[-1][0] == devices[0]:
            runs[-1][1].append(task.id)
            runs[-1][2].extend(nodes)
        else:
            runs.append((devices[0], [task.id], list(nodes)))
    if not runs:
        raise InvalidInput("the model computes nothing: no task has an operation")
    return [(d, tuple(t), n) for d, t, n in runs]


def _stage_module(gm: fx.GraphModule, inputs: Sequence[fx.Node], nodes: Sequence[fx.Node],
                  outputs: Sequence[fx.Node]) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {n: g.placeholder(n.name) for n in inputs}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op == "get_attr":
                env[n] = g.get_attr(str(n.target))
            elif n.op in ("placeholder", "output"):  # the carry holds every value used
                raise AssertionError(f"stage is missing value {n.name}")
            else:  # computed from parameters only (in no task): recomputed where used
                env[n] = g.node_copy(n, arg)
        return env[n]

    for n in nodes:
        env[n] = g.node_copy(n, arg)
    g.output(tuple(arg(n) for n in outputs))
    return fx.GraphModule(gm, g)


def _example_values(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[fx.Node, Any]:
    values: dict[fx.Node, Any] = {}

    class _Keep(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    with torch.inference_mode():
        _Keep(gm).run(*example_inputs)
    return values


# -- export ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageFile:
    """One exported stage: the artifact a device loads."""

    stage: int
    device: DeviceId
    runtime: str
    path: Path
    sha256: str
    size: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def export(part: Partition, example_inputs: Sequence[Any], out_dir: Path,
           runtime: str | Mapping[DeviceId, str] = "onnx",
           calibration: Sequence[Any] | None = None) -> list[StageFile]:
    """Write every stage to ``out_dir`` for its device's runtime (one name, or one per
    device): ``onnx``, ``onnx-int8`` or ``tflite-int8``. int8 stages are calibrated on
    ``calibration`` (the model's batch-first calibration inputs) run through the stages
    before them."""
    from edgeswarm.models.runtimes import compile as compile_runtime

    out_dir.mkdir(parents=True, exist_ok=True)
    examples = part.stage_inputs(*example_inputs)
    calib = part.stage_inputs(*calibration) if calibration is not None else None
    files = []
    for pos, stage in enumerate(part.stages):
        rt = runtime if isinstance(runtime, str) else runtime.get(stage.device, "onnx")
        if rt not in stage.runtimes:
            raise InvalidInput(f"stage {stage.index} on {stage.device!r}: runtime {rt!r} "
                               f"cannot be exported as a shard of this model; use "
                               f"{', '.join(stage.runtimes)}")
        base = out_dir / f"stage{stage.index}-{stage.device}"
        if rt == "tflite-int8":
            exe = compile_runtime(stage.module, runtime=rt, example_inputs=list(examples[pos]),
                                  calibration=list(calib[pos]) if calib else None,
                                  output=base, input_names=stage.inputs,
                                  output_names=stage.outputs)
            if exe.path is None:  # the LiteRT runtime always writes its file
                raise InvalidInput(f"runtime {rt!r} wrote no artifact for stage {stage.index}")
            path = exe.path
        else:
            path = base.with_name(base.name + (".onnx" if rt == "onnx" else ".fp32.onnx"))
            stage.write_onnx(examples[pos], path)
            if rt == "onnx-int8":
                fp32 = path
                exe = compile_runtime(fp32, runtime=rt, output=base.with_name(base.name + ".onnx"),
                                      calibration=[_np(c) for c in calib[pos]] if calib else None)
                fp32.unlink()
                assert exe.path is not None  # ONNX Runtime artifacts are files
                path = exe.path
        files.append(StageFile(stage.index, stage.device, rt, path, sha256_of(path),
                               path.stat().st_size, stage.inputs, stage.outputs))
    return files


def export_stage_onnx(stage: Stage, inputs: Sequence[torch.Tensor], path: Path) -> Path:
    """One stage to ONNX (opset 18, batch dimension dynamic), checked by onnx.checker.

    Stages go through torch's TorchScript-based exporter: a stage is a plain fx graph of
    the model's own operators, which it exports in a fraction of a second, where the
    dynamo exporter takes seconds; re-planning after a device leaves exports the stages
    that changed while requests wait. Falls back to the dynamo exporter if it fails."""
    import contextlib
    import io
    import warnings

    import onnx

    from edgeswarm.models.runtimes.onnx_export import OPSET, export_onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(stage.module, args, str(path), input_names=list(stage.inputs),
                              output_names=list(stage.outputs), dynamo=False,
                              opset_version=OPSET,
                              dynamic_axes={n: {0: "batch"} for n in
                                            (*stage.inputs, *stage.outputs)})
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # an operator the old exporter lacks: take the slow path
        log.debug("stage %d: TorchScript export failed (%s); using dynamo", stage.index, exc)
        export_onnx(stage.module, list(args), path, stage.inputs, stage.outputs)
    return path


def _np(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
