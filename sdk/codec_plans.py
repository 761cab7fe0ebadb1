"""Plans with feature codecs on cut edges: measured for the planner, shipped to the devices.

**Planning.** :func:`measure` runs each codec a caller names (``fp16``, ``int8``,
``learned[:β]``) on the model's own activations, one sample per message as a pipeline
sends them, on one torch thread, and turns the measurements into the planner's codec table
(:func:`edgeswarm.models.codecs.codec_table`, starting from ``none`` only, so the planner
chooses among exactly these). A learned codec is trained for one cut of one model: it is
accepted only for that model (the zoo's weights), and its table entry is valid on its edge
only, so a policy offers it nowhere else. Codec seconds per byte become FLOPs per byte
through :func:`reference_flops`, this machine's single-thread matmul rate, the setting the
codecs were timed in.

**Deploying.** :func:`shipping` turns a plan's edge codecs into codecs on the values that
cross each stage boundary of the partition (a value carries the codec of its edges into
later stages; two different codecs on one value are refused), gives the stages after a
learned codec's cut the tail weights fine-tuned for it (``Stage.variant`` tells their
exported files apart), and serves a learned codec's two artifact files to the devices,
which verify them by sha256. A codec on an edge out of the model's input is not shipped:
the coordinator sends the inputs as they are.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from edgeswarm.device_agent.manifest import CodecRef
from edgeswarm.placement.codecs import NONE, CodecSpec
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan

if TYPE_CHECKING:
    from torch import fx

    from edgeswarm.cluster import Model
    from edgeswarm.device_agent.artifacts import ArtifactServer
    from edgeswarm.models.codecs import Codec
    from edgeswarm.models.graph import Traced
    from edgeswarm.models.partition import Partition
    from edgeswarm.shards import StageCodecs

#: Samples each codec is measured on (each its own message).
SAMPLES = 16
#: torch threads while codecs are timed (see edgeswarm.bench.compression.CODEC_THREADS).
CODEC_THREADS = 1
#: The codec families a plan may put on a cut edge.
PLANNABLE = ("fp16", "int8", "learned")
_MATMUL_N = 256

Clock = Callable[[], float]


@dataclass(frozen=True)
class CodecSet:
    """The codecs one model may use, measured on this machine."""

    model: str
    #: full name (``int8``, ``learned:1e-05``) -> the codec with its measured profile
    codecs: Mapping[str, Codec]
    #: the planner's table: ``none`` and every codec of :attr:`codecs`
    table: Mapping[str, CodecSpec]
    #: FLOP/s of the setting the codecs were timed in (see :func:`reference_flops`)
    reference_flops: float

    def codec(self, name: str) -> Codec:
        try:
            return self.codecs[name]
        except KeyError:
            raise InvalidInput(f"codec {name!r} was not measured for {self.model} (measured: "
                               f"{', '.join(self.codecs) or 'none'})") from None


def measure(model: Model, names: Iterable[str], *, samples: int = SAMPLES,
            clock: Clock = time.perf_counter, flops: float | None = None) -> CodecSet:
    """Measure the codecs ``names`` on ``model``'s activations now (see the module doc);
    ``flops``: the reference FLOP/s, measured when None."""
    import torch

    from edgeswarm.models import codecs as registry

    wanted = [n for n in dict.fromkeys(names) if n != "none"]
    if samples < 1:
        raise InvalidInput(f"codec measurement needs at least one sample, got {samples}")
    chosen = [resolve(model, name) for name in wanted]
    inputs = _sample_inputs(model, samples)
    edges = {c.full_name: _edge_of(model, c) for c in chosen}
    values = _edge_values(model.trace(), inputs, set(edges.values()))
    saved = torch.get_num_threads()
    torch.set_num_threads(CODEC_THREADS)
    try:
        reference = flops if flops is not None else reference_flops(clock)
        done = []
        for c in chosen:
            m = registry.measure(c, values[edges[c.full_name]], clock)
            done.append(c.with_profile(m.profile("coordinator, 1 torch thread")))
    finally:
        torch.set_num_threads(saved)
    table = registry.codec_table(done, reference, base={"none": NONE})
    return CodecSet(model.name, {c.full_name: c for c in done}, table, reference)


#: Codecs measured in this process, per model module (they depend on this machine and the
#: model, not on the cluster), and this machine's reference FLOP/s.
_measured: weakref.WeakKeyDictionary[Any, dict[str, Codec]] = weakref.WeakKeyDictionary()
_reference: list[float] = []
_lock = threading.Lock()


def measured(model: Model, names: Iterable[str]) -> CodecSet:
    """:func:`measure`, each codec once per model module in this process: planning and
    deploying the same model reuse the measurement."""
    wanted = [full_name(n) for n in dict.fromkeys(names) if n != "none"]
    with _lock:
        have = _measured.setdefault(model.module, {})
        missing = [n for n in wanted if n not in have]
        if missing or not _reference:
            new = measure(model, missing, flops=_reference[0] if _reference else None)
            _reference[:1] = [new.reference_flops]
            have.update(new.codecs)
        chosen = [have[n] for n in wanted]
        reference = _reference[0]
    from edgeswarm.models import codecs as registry

    table = registry.codec_table(chosen, reference, base={"none": NONE})
    return CodecSet(model.name, {c.full_name: c for c in chosen}, table, reference)


def resolve(model: Model, name: str) -> Codec:
    """The codec ``name`` for ``model``; InvalidInput for codecs a cut edge cannot carry
    and for a learned codec trained for another model."""
    from edgeswarm.models import codecs as registry

    family, _, setting = name.partition(":")
    if family not in PLANNABLE:
        raise InvalidInput(f"codec {name!r} cannot go on a cut edge; plan with "
                           f"{', '.join(PLANNABLE)} (learned takes a β: learned:1e-05)")
    if family != "learned":
        return registry.get(name)
    from edgeswarm.models.codecs.train import LearnedRecipe, cached_codec

    recipe = LearnedRecipe()
    if model.name != recipe.model:
        raise InvalidInput(f"the learned codec is trained for {recipe.model}, not "
                           f"{model.name}; plan {model.name} with fp16 or int8")
    if setting:
        try:
            recipe = LearnedRecipe(beta=float(setting))
        except ValueError:
            raise InvalidInput(f"codec {name!r}: β {setting!r} is not a number") from None
    codec = cached_codec(recipe, model.module)
    if codec is None:  # not trained yet (for the zoo's weights: train it now), or not ours
        registry.get(f"learned:{recipe.beta:g}")
        codec = cached_codec(recipe, model.module)
    if codec is None:
        raise InvalidInput(f"the learned codec is trained for the zoo's {recipe.model} "
                           f"weights; this {model.name} module has other weights")
    return codec


def reference_flops(clock: Clock = time.perf_counter, seconds: float = 0.1) -> float:
    """FLOP/s of fp32 matmuls on one torch thread (the median of repeated multiplies),
    the setting codecs are timed in: their seconds per byte times this are their FLOPs
    per byte in the planner's table."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(_MATMUL_N, _MATMUL_N, generator=torch.Generator().manual_seed(0))
        a @ a  # warm up
        steps: list[float] = []
        start = clock()
        while len(steps) < 10_000 and (not steps or clock() - start < seconds):
            t0 = clock()
            a @ a
            steps.append(clock() - t0)
    finally:
        torch.set_num_threads(saved)
    return 2.0 * _MATMUL_N**3 / max(statistics.median(steps), 1e-12)


# -- deploying ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Shipping:
    """What a plan with codecs deploys: the partition (stages after a learned cut tuned)
    and, per stage, the codecs of its inputs and outputs for the manifest."""

    partition: Partition
    codecs: list[StageCodecs]


def hop_codecs(part: Partition, plan: Plan, traced: Traced) -> list[tuple[str, ...]]:
    """Per stage, the codec of each value it sends to the next stage (``none``: as it is;
    the last stage's outputs go to the coordinator uncoded)."""
    task_of = {n.name: tid for tid, nodes in traced.nodes.items() for n in nodes}
    stage_of = {t: s.index for s in part.stages for t in s.tasks}
    out: list[tuple[str, ...]] = []
    for k, stage in enumerate(part.stages):
        if k == len(part.stages) - 1:
            out.append(("none",) * len(stage.outputs))
            continue
        names = []
        for value in stage.outputs:
            src = task_of.get(value)
            chosen = {plan.codecs[(s, d)]: (s, d) for (s, d) in plan.codecs
                      if s == src and stage_of.get(d, -1) > k}
            if len(chosen) > 1:
                edges = ", ".join(f"{s}->{d}: {c}" for c, (s, d) in chosen.items())
                raise InvalidInput(f"value {value!r} crosses from stage {k} to {k + 1} once "
                                   f"but the plan puts different codecs on its edges "
                                   f"({edges}); use one codec for them")
            names.append(next(iter(chosen), "none"))
        out.append(tuple(names))
    return out


def shipping(part: Partition, plan: Plan, traced: Traced, codecs: CodecSet,
             server: ArtifactServer) -> Shipping:
    """The partition and manifest codecs that deploy ``plan``'s codecs (module doc)."""
    hops = hop_codecs(part, plan, traced)
    used = sorted({n for names in hops for n in names} - {"none"})
    refs = {name: _ref(codecs.codec(name), server) for name in used}
    part = _tune(part, plan, hops, codecs)
    per_stage: list[StageCodecs] = []
    for k in range(len(part.stages)):
        recv = hops[k - 1] if k > 0 else ()
        send = hops[k]
        per_stage.append((_refs(recv, refs), _refs(send, refs)))
    return Shipping(part, per_stage)


def _refs(names: Sequence[str], refs: Mapping[str, CodecRef]) -> list[CodecRef] | None:
    if all(n == "none" for n in names):
        return None
    return [refs[n] if n != "none" else CodecRef(name="none") for n in names]


def _ref(codec: Codec, server: ArtifactServer) -> CodecRef:
    from edgeswarm.models.codecs.deploy import artifact_files

    return CodecRef(name=codec.full_name,
                    artifacts=[server.add(path) for path in artifact_files(codec)])


def _tune(part: Partition, plan: Plan, hops: Sequence[tuple[str, ...]], codecs: CodecSet
          ) -> Partition:
    """Give the stages after a learned codec's cut its fine-tuned tail weights."""
    from edgeswarm.models.codecs.learned import LearnedCodec

    learned = {n for names in hops for n in names if n.startswith("learned")}
    if not learned:
        return part
    if len(learned) > 1:
        raise InvalidInput(f"a plan may use one learned codec; this one uses "
                           f"{', '.join(sorted(learned))}")
    codec = codecs.codec(learned.pop())
    assert isinstance(codec, LearnedCodec)
    split, next_task = codec.edge
    cut = next((k for k, s in enumerate(part.stages) if s.tasks[-1] == split), None)
    if cut is None or cut + 1 >= len(part.stages) or part.stages[cut + 1].tasks[0] != next_task:
        raise InvalidInput(f"codec {codec.full_name!r} is trained for the cut between "
                           f"{split!r} and {next_task!r}; the plan must cut the model there")
    variant = f"{codec.full_name}@{codec.sha256[:16]}"
    stages = tuple(s if k <= cut else dataclasses.replace(
        s, module=cast("fx.GraphModule", codec.tune_stage(s.module)), variant=variant)
        for k, s in enumerate(part.stages))
    return dataclasses.replace(part, stages=stages)


# -- activations to measure on ------------------------------------------------------------
def full_name(name: str) -> str:
    """The name a measured codec goes by: ``learned`` with its default β spelled out, a
    β as the codec spells it (``learned:1e-5`` -> ``learned:1e-05``)."""
    family, _, setting = name.partition(":")
    if family != "learned":
        return name
    from edgeswarm.models.codecs.train import LearnedRecipe

    try:
        beta = float(setting) if setting else LearnedRecipe().beta
    except ValueError:
        raise InvalidInput(f"codec {name!r}: β {setting!r} is not a number") from None
    return f"learned:{beta}"


def _sample_inputs(model: Model, samples: int) -> tuple[Any, ...]:
    """Up to ``samples`` rows of real data: the calibration set, else the example inputs."""
    source = model.calibration or model.example_inputs
    return tuple(x[:samples] for x in source)


def _edge_of(model: Model, codec: Codec) -> tuple[str, str]:
    """The edge whose activation ``codec`` is measured on: a learned codec's own edge,
    else the model's largest activation between two tasks."""
    edge = getattr(codec, "edge", None)
    if edge is not None:
        return (str(edge[0]), str(edge[1]))
    graph = model.graph
    computing = {t.id for t in graph.tasks if t.flops > 0}
    edges = [e for e in graph.edges if e.src in computing]
    if not edges:
        raise InvalidInput(f"{model.name} has no activation between two tasks to put a codec on")
    best = max(edges, key=lambda e: e.bytes)
    return (str(best.src), str(best.dst))


def _edge_values(traced: Traced, inputs: Sequence[Any], edges: set[tuple[str, str]]
                 ) -> dict[tuple[str, str], np.ndarray]:
    """The activation each edge carries when the model runs on ``inputs``."""
    import torch
    from torch import fx

    task_of = {n: tid for tid, nodes in traced.nodes.items() for n in nodes}
    node_of: dict[tuple[str, str], fx.Node] = {}
    for s, d in edges:
        for n in traced.nodes.get(d, ()):  # type: ignore[call-overload]
            found = next((a for a in n.all_input_nodes if task_of.get(a) == s), None)
            if found is not None:
                node_of[(s, d)] = found
                break
        if (s, d) not in node_of:
            raise InvalidInput(f"{s}->{d} carries no value of the traced model")
    wanted = set(node_of.values())
    values: dict[fx.Node, Any] = {}

    class _Keep(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.inference_mode():
        _Keep(traced.module).run(*inputs)
    out: dict[tuple[str, str], np.ndarray] = {}
    for edge, node in node_of.items():
        value = values.get(node)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InvalidInput(f"{edge[0]}->{edge[1]} carries {type(value).__name__}, not a "
                               f"float tensor: no codec can go there")
        out[edge] = value.detach().float().numpy()
    return out
