"""The network each zoo model's spiking conversion starts from.

The digits models convert as trained: within a point of the ANN after 2-4 steps.
scene-cnn, converted as trained, needs 32 steps (docs/spiking.md), so its ``snn`` runtime
converts a copy fine-tuned for few steps, from the trained weights:

1. QCFS (:mod:`~edgeswarm.models.spiking.qcfs`): every ReLU becomes an ``L``-level
   quantized clip, each ``λ`` fitted by :func:`~edgeswarm.models.spiking.qcfs.fit_thresholds`
   on training data, then the network is fine-tuned with the quantization in place and a
   penalty on the synaptic operations its SNN will do;
2. through time (:mod:`~edgeswarm.models.spiking.surrogate`): the QCFS network is run
   as the SNN it converts to and trained with surrogate gradients for its steps.

With L = 8 and 16 steps it is within half a point of the ANN at 16 steps (32 before) and
its exit stops inputs after 7.4 steps on average; docs/spiking.md has the measurements and
the recipes that did worse.

The fine-tuned weights are cached like the zoo's own (safetensors in
:func:`~edgeswarm.models.zoo.cache.cache_dir`, named by a hash of the base weights and
the recipe), so the first use trains (single-threaded, deterministic) and later ones
read the file. The ANN the spiking network is measured against stays the zoo model as
trained: the fine-tuning is part of the conversion, not a new reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgeswarm.models.spiking.qcfs import QcfsRecipe, finetune, fit_thresholds, with_qcfs
from edgeswarm.models.spiking.surrogate import ThroughTimeRecipe, finetune_through_time
from edgeswarm.models.zoo import ZooModel
from edgeswarm.models.zoo import training as zoo_training

log = logging.getLogger("edgeswarm.models.spiking")


@dataclass(frozen=True)
class FewStepRecipe:
    """Both stages of fine-tuning a zoo model for few-step conversion."""

    qcfs: QcfsRecipe
    through_time: ThroughTimeRecipe
    #: training inputs :func:`fit_thresholds` scores the thresholds on
    search_rows: int = 512


#: Zoo models whose conversion starts from a fine-tuned copy (the others convert as trained).
RECIPES: dict[str, FewStepRecipe] = {
    "scene-cnn": FewStepRecipe(
        QcfsRecipe(levels=8, epochs=2, lr=2e-3, sop_weight=0.05, steps=16),
        ThroughTimeRecipe(steps=16, samples=512, batch_size=32, lr=2e-4)),
}

#: (inputs, labels, prepare) of a zoo model's training split.
TrainingData = tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]


def for_conversion(model: ZooModel) -> nn.Module:
    """The network ``compile(model, runtime="snn")`` converts: the fine-tuned copy when
    :data:`RECIPES` has one for ``model.name`` (trained once, then read from the cache),
    else ``model.module`` itself."""
    recipe = RECIPES.get(model.name)
    if recipe is None:
        return model.module
    with zoo_training.deterministic(recipe.qcfs.seed, recipe.qcfs.threads):
        net = with_qcfs(model.module, model.calibration[0], recipe.qcfs.levels,
                        recipe.qcfs.percentile)
        path = zoo_training.weights_path(f"{model.name}-snn", _key(model.module, net, recipe))
        zoo_training.load_or_train(net, path, lambda m: _tune(model.name, m, recipe))
    return net


def _tune(name: str, net: nn.Module, recipe: FewStepRecipe) -> None:
    log.info("%s: fine-tuning for few-step spiking conversion (first use; cached after)",
             name)
    inputs, labels, prepare = _TRAINING_DATA[name]()
    rows = inputs[:recipe.search_rows]
    fit_thresholds(net, rows if prepare is None else prepare(rows), labels[:recipe.search_rows])
    finetune(net, inputs, labels, recipe.qcfs, prepare)
    finetune_through_time(net, inputs, labels, recipe.through_time, prepare)


def _key(base: nn.Module, net: nn.Module, recipe: FewStepRecipe) -> str:
    """Hash of the base weights, the fine-tuned architecture and the recipe."""
    weights = hashlib.sha256()
    for k, v in sorted(base.state_dict().items()):
        weights.update(k.encode())
        weights.update(v.detach().contiguous().numpy().tobytes())
    blob = json.dumps({"format": zoo_training.CACHE_FORMAT, "base": weights.hexdigest(),
                       "architecture": repr(net), "recipe": asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scene_training() -> TrainingData:
    from edgeswarm.models.zoo import scene

    split = scene.read_split(scene.dataset_path(scene.RECIPE), "train")
    return torch.from_numpy(split.images), torch.from_numpy(split.labels), scene.to_input


_TRAINING_DATA: dict[str, Callable[[], TrainingData]] = {"scene-cnn": _scene_training}
