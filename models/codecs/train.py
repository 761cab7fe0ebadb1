"""Training the learned codec in two stages, like Entropic Student, and caching it.

The teacher (the zoo model) is cut after task ``split``: its *head* runs on the sender,
its *tail* on the receiver. With the teacher frozen:

1. **Feature distillation + rate.** Encoder, entropy model and decoder learn to
   reproduce the teacher's activation at the cut (mean squared error, normalized by the
   activation's mean square) plus ``β`` × the latent's bits under the learned prior (noisy
   rounding while training). ``next_weight`` > 0 also distils the teacher's activation one
   task later (the frozen next task applied to the reconstruction); on scene-cnn that cost
   twice the time and gained nothing, so it is off by default. CompressAI's quantile
   estimates train beside it on their own loss.
2. **Fine-tune the tail with the task loss.** Encoder and entropy model are frozen (the
   rate is fixed); decoder and a copy of the tail learn on the *rounded* latent with
   cross-entropy to the labels plus knowledge distillation from the teacher's logits.
   Batch-norm statistics stay the teacher's.

Everything the teacher computes for training (activations at the cut, one task later,
and its logits) is computed once and shared by every β. A trained codec is cached in
:func:`~edgeswarm.models.zoo.cache.cache_dir` as safetensors + JSON under a key that
hashes the recipe, the teacher's weights and CompressAI's version, like the zoo caches
its models; a changed recipe retrains and an unchanged one is read back.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from edgeswarm.models.codecs.learned import (
    Bottleneck,
    BottleneckShape,
    LearnedCodec,
    artifact_paths,
    load_artifact,
    save_artifact,
)
from edgeswarm.models.graph import trace
from edgeswarm.models.partition import partition
from edgeswarm.models.zoo import ZooModel
from edgeswarm.models.zoo.cache import cache_dir
from edgeswarm.models.zoo.training import deterministic
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.taskgraph import TaskId

log = logging.getLogger("edgeswarm.models.codecs")

#: Bump when the meaning of a cached codec changes without its recipe changing.
CACHE_FORMAT = 1
#: The rate weights the benchmark trains (bits are per sample).
BETAS = (3e-4, 1e-4, 3e-5, 1e-5, 1e-6)
#: Rows of teacher data computed per forward pass.
_CHUNK = 500

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LearnedRecipe:
    """Everything that decides a trained codec (hashed into its cache key)."""

    model: str = "scene-cnn"
    #: the sender's last task: the codec codes the activation it hands on
    split: str = "conv1"
    #: weight of the rate (bits per sample) against the normalized distillation loss
    beta: float = 1e-5
    #: weight of also distilling the next task's activation (through the frozen next task)
    #: in stage 1; 0 distils the activation at the cut only
    next_weight: float = 0.0
    latent_channels: int = 16
    hidden: int = 64
    stage1_epochs: int = 4
    #: 8, not 3: on an AMD EPYC host 3 left β=1e-5 at 0.892 (teacher 0.914), 8 reach 0.906
    stage2_epochs: int = 8
    batch_size: int = 64
    stage1_lr: float = 3e-3
    stage2_lr: float = 3e-4
    aux_lr: float = 1e-2
    kd_temperature: float = 4.0
    #: share of the knowledge-distillation term in stage 2's loss (the rest: cross-entropy)
    kd_weight: float = 0.9
    #: stage 2 fine-tunes the tail with the decoder (False: the decoder only)
    tune_tail: bool = True
    #: train on the first rows of the training split only (None: all of it)
    train_rows: int | None = None
    seed: int = 0
    #: torch threads while training: fixed, so the codec does not depend on the host (one
    #: thread is also the fastest on a shared two-core machine)
    threads: int = 1

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise InvalidInput(f"learned codec: beta {self.beta} must be > 0")
        if self.stage1_epochs < 1 or self.stage2_epochs < 0 or self.batch_size < 1:
            raise InvalidInput("learned codec: epochs and batch size must be positive")


@dataclass(frozen=True)
class Cut:
    """The teacher cut for training: head (sender), next task, rest (receiver)."""

    head: fx.GraphModule
    next: fx.GraphModule
    rest: fx.GraphModule
    next_task: TaskId


@dataclass(frozen=True)
class TeacherData:
    """The teacher's view of the training rows, shared by every β."""

    features: torch.Tensor   # at the cut, float16
    targets: torch.Tensor    # one task later, float16
    logits: torch.Tensor
    labels: torch.Tensor
    feature_scale: float     # mean square of features (normalizes the distillation loss)
    target_scale: float


def cut(model: ZooModel, split: str) -> Cut:
    """Cut ``model`` after task ``split`` and after the task that follows it."""
    traced = trace(model.module, model.example_inputs)
    ids = [t.id for t in traced.graph.tasks]
    computing = [t for t in ids if traced.nodes[t] and any(
        n.op != "placeholder" for n in traced.nodes[t])]
    if split not in computing or computing.index(TaskId(split)) > len(computing) - 3:
        raise InvalidInput(
            f"learned codec: cannot cut {model.name} after {split!r}; choose a task with at "
            f"least two tasks after it: {', '.join(computing[:-2])}")
    k = computing.index(TaskId(split))
    nxt = computing[k + 1]
    device = {t: "head" for t in ids}
    for t in computing[k + 1:]:
        device[t] = "next" if t == nxt else "rest"
    part = partition(model.module, model.example_inputs,
                     Plan({TaskId(t): (d,) for t, d in device.items()}), traced)  # type: ignore[misc]
    head, middle, rest = (s.module for s in part.stages)
    return Cut(head, middle, rest, TaskId(nxt))


def teacher_data(model: ZooModel, c: Cut, images: torch.Tensor, labels: torch.Tensor,
                 prepare: Callable[[torch.Tensor], torch.Tensor]) -> TeacherData:
    feats, targets, logits = [], [], []
    with torch.inference_mode():
        for start in range(0, len(labels), _CHUNK):
            h = c.head(prepare(images[start:start + _CHUNK]))[0]
            t = c.next(h)[0]
            feats.append(h.half())
            targets.append(t.half())
            logits.append(c.rest(t)[0])
    f, t = torch.cat(feats), torch.cat(targets)
    return TeacherData(f, t, torch.cat(logits), labels, float(f.float().pow(2).mean()),
                       float(t.float().pow(2).mean()))


def scene_training_split(rows: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """scene-cnn's training scenes (uint8) and labels."""
    from edgeswarm.models.zoo import scene

    split = scene.read_split(scene.dataset_path(scene.RECIPE), "train", rows=rows)
    return torch.from_numpy(split.images), torch.from_numpy(split.labels)


def train(recipe: LearnedRecipe, model: ZooModel, c: Cut, data: TeacherData,
          progress: Progress | None = None) -> tuple[Bottleneck, dict[str, torch.Tensor],
                                                     dict[str, object]]:
    """Both stages for one recipe; returns the bottleneck, the tail state and metadata.
    Call inside :func:`~edgeswarm.models.zoo.training.deterministic`."""
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    shape = BottleneckShape(tuple(data.features.shape[1:]),  # type: ignore[arg-type]
                            recipe.latent_channels, recipe.hidden)
    bottleneck = Bottleneck(shape)
    frozen_next = copy.deepcopy(c.next).eval().requires_grad_(False)
    order = torch.Generator().manual_seed(recipe.seed)
    n = len(data.labels)
    steps = math.ceil(n / recipe.batch_size)

    # stage 1: feature distillation + rate
    main = torch.optim.Adam(bottleneck.main_parameters(), lr=recipe.stage1_lr)
    aux = torch.optim.Adam(bottleneck.aux_parameters(), lr=recipe.aux_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(main, recipe.stage1_lr,
                                                   total_steps=recipe.stage1_epochs * steps)
    history: dict[str, list[float]] = {"stage1_loss": [], "stage1_bits": [], "stage2_loss": []}
    bottleneck.train()
    for epoch in range(recipe.stage1_epochs):
        say(f"{recipe.split} β={recipe.beta:g}: stage 1, epoch {epoch + 1}/"
            f"{recipe.stage1_epochs}")
        losses, rates = [], []
        for rows in torch.randperm(n, generator=order).split(recipe.batch_size):
            h = data.features[rows].float()
            recon, likelihoods = bottleneck(h)
            distill = F.mse_loss(recon, h) / data.feature_scale
            if recipe.next_weight:
                distill = distill + recipe.next_weight * F.mse_loss(
                    frozen_next(recon)[0], data.targets[rows].float()) / data.target_scale
            bits = -torch.log2(likelihoods).sum() / len(rows)
            loss = distill + recipe.beta * bits
            main.zero_grad(set_to_none=True)
            loss.backward()
            main.step()
            schedule.step()
            aux.zero_grad(set_to_none=True)
            bottleneck.entropy.loss().backward()
            aux.step()
            losses.append(float(loss.detach()))
            rates.append(float(bits.detach()))
        history["stage1_loss"].append(sum(losses) / len(losses))
        history["stage1_bits"].append(sum(rates) / len(rates))
    bottleneck.eval()
    bottleneck.entropy.update(force=True)
    bottleneck.encoder.requires_grad_(False)
    bottleneck.entropy.requires_grad_(False)

    # stage 2: fine-tune decoder and tail with the task loss on the rounded latent
    with torch.inference_mode():
        latents = torch.cat([bottleneck.quantized(data.features[s:s + _CHUNK].float())
                             for s in range(0, n, _CHUNK)])
    tail = nn.ModuleDict({"next": copy.deepcopy(c.next), "rest": copy.deepcopy(c.rest)})
    tail.eval().requires_grad_(recipe.tune_tail)
    params = [*bottleneck.decoder.parameters(),
              *(tail.parameters() if recipe.tune_tail else ())]
    tune = torch.optim.Adam(params, lr=recipe.stage2_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        tune, recipe.stage2_lr, total_steps=max(1, recipe.stage2_epochs * steps))
    temp, w = recipe.kd_temperature, recipe.kd_weight
    for epoch in range(recipe.stage2_epochs):
        say(f"{recipe.split} β={recipe.beta:g}: stage 2, epoch {epoch + 1}/"
            f"{recipe.stage2_epochs}")
        losses = []
        for rows in torch.randperm(n, generator=order).split(recipe.batch_size):
            logits = tail["rest"](tail["next"](bottleneck.decoder(latents[rows].clone()))[0])[0]
            kd = F.kl_div(F.log_softmax(logits / temp, 1),
                          F.softmax(data.logits[rows] / temp, 1), reduction="batchmean")
            loss = (1 - w) * F.cross_entropy(logits, data.labels[rows]) + w * temp**2 * kd
            tune.zero_grad(set_to_none=True)
            loss.backward()
            tune.step()
            schedule.step()
            losses.append(float(loss.detach()))
        history["stage2_loss"].append(sum(losses) / len(losses))
    bottleneck.eval().requires_grad_(False)
    tail_state = {**tail["next"].state_dict(), **tail["rest"].state_dict()}
    tail_state = {k: v.detach().clone() for k, v in tail_state.items()}
    with torch.inference_mode():
        sample = data.features[:min(n, _CHUNK)].float()
        strings = bottleneck.entropy.compress(bottleneck.encoder(sample))
    meta: dict[str, object] = {
        "model": model.name, "split": recipe.split, "next_task": c.next_task,
        "beta": recipe.beta, "recipe": asdict(recipe),
        "train_bytes_per_sample": sum(map(len, strings)) / len(strings),
        "train_seconds": round(time.perf_counter() - started, 1),
        "history": {k: [round(v, 5) for v in vs] for k, vs in history.items()},
    }
    return bottleneck, tail_state, meta


def codec_stem(recipe: LearnedRecipe, model: ZooModel | nn.Module) -> Path:
    """Where the codec trained by ``recipe`` on this teacher (a zoo model or its module)
    is cached (no suffix)."""
    module = model if isinstance(model, nn.Module) else model.module
    blob = json.dumps({"format": CACHE_FORMAT, "recipe": asdict(recipe),
                       "teacher": teacher_fingerprint(module),
                       "compressai": _compressai_version()}, sort_keys=True).encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    return cache_dir() / f"{recipe.model}-codec-{recipe.split}-b{recipe.beta:g}-{key}"


def teacher_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_train(recipes: Sequence[LearnedRecipe], model: ZooModel | None = None,
                  progress: Progress | None = None) -> list[LearnedCodec]:
    """The codec of every recipe, read from the cache or trained (and cached) now.

    Recipes that must be trained share the teacher's training data when they agree on
    model, split and training rows.
    """
    if not recipes:
        return []
    names = {r.model for r in recipes}
    if names != {"scene-cnn"}:
        raise InvalidInput(f"the learned codec trains on scene-cnn's real training data; "
                           f"no recipe for {sorted(names - {'scene-cnn'})}")
    if model is None:
        from edgeswarm.models import zoo

        model = zoo.load("scene-cnn")
    out: dict[int, LearnedCodec] = {}
    todo: list[int] = []
    for i, r in enumerate(recipes):
        stem = codec_stem(r, model)
        if all(path.exists() for path in artifact_paths(stem)):
            out[i] = load_artifact(stem)
        else:
            todo.append(i)
    shared: dict[tuple[str, int | None], tuple[Cut, TeacherData]] = {}
    for i in todo:
        r = recipes[i]
        with deterministic(r.seed, r.threads):
            key = (r.split, r.train_rows)
            if key not in shared:
                (progress or (lambda _m: None))(f"{r.split}: teacher activations")
                c = cut(model, r.split)
                images, labels = scene_training_split(r.train_rows)
                from edgeswarm.models.zoo.scene import to_input

                shared[key] = (c, teacher_data(model, c, images, labels, to_input))
            c, data = shared[key]
            bottleneck, tail_state, meta = train(r, model, c, data, progress)
        meta["compressai"] = _compressai_version()
        stem = codec_stem(r, model)
        save_artifact(bottleneck, tail_state, meta, stem)
        log.info("trained learned codec %s in %.1f s", stem.name, meta["train_seconds"])
        out[i] = load_artifact(stem)
    return [out[i] for i in range(len(recipes))]


def cached_codec(recipe: LearnedRecipe, teacher: nn.Module) -> LearnedCodec | None:
    """The codec ``recipe`` trained on exactly ``teacher``'s weights, if it is cached."""
    stem = codec_stem(recipe, teacher)
    if all(path.exists() for path in artifact_paths(stem)):
        return load_artifact(stem)
    return None


def recipes_for(betas: Sequence[float], base: LearnedRecipe | None = None) -> list[LearnedRecipe]:
    base = base or LearnedRecipe()
    return [replace(base, beta=float(b)) for b in betas]


def _compressai_version() -> str:
    try:
        return metadata.version("compressai")
    except metadata.PackageNotFoundError:
        return "missing"
