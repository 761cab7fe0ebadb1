"""scene-cnn: a plain conv-stack classifier on camera-like RGB scenes.

Inputs are ``(N, 3, 64, 64)`` float32 RGB in [0, 1]: crops of real photographs with one
real handwritten digit composited on (see :mod:`~edgeswarm.models.zoo.scene_data`);
outputs are logits ``(N, 10)`` for the digit. Early activations are larger than the
input (16x32x32 after the stem, 32x32x32 before the first pool, against 3x64x64 in),
which is what makes the network interesting to split between devices.

The data set and the weights are both cached in
:func:`~edgeswarm.models.zoo.cache.cache_dir` as safetensors, keyed by hashes of their
recipes; the first load builds the scenes and trains (about a minute on two CPU cores),
later loads read the cache.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from edgeswarm.models.zoo import digits, scene_data, training
from edgeswarm.models.zoo.cache import cache_dir
from edgeswarm.models.zoo.digits import CALIBRATION_ROWS
from edgeswarm.models.zoo.scene_data import SceneRecipe, SceneSplit
from edgeswarm.models.zoo.spec import HeldOut, ZooModel
from edgeswarm.models.zoo.training import TrainConfig
from edgeswarm.placement.errors import InvalidInput, ModelFileError

log = logging.getLogger("edgeswarm.models.zoo")

RECIPE = SceneRecipe()
TRAIN = TrainConfig(epochs=7, batch_size=64, lr=4e-3, weight_decay=5e-4, threads=2)
#: Training runs in channels-last layout (about 1.5x faster convolutions on CPU); the
#: layout changes rounding, so it is part of the weights' cache key.
TRAIN_LAYOUT = "channels_last"
_SPLITS = ("train", "heldout")


def build_cnn() -> nn.Sequential:
    """Stride-2 stem, three conv/pool stages, a global max-pool and a linear layer.

    64x64x3 -> 32x32x16 -> 16x16x32 -> 8x8x64 -> 4x4x128 -> 128 -> 10. Every conv is
    followed by BatchNorm and ReLU. The global pool is a max (the digit covers a part
    of the scene; averaging dilutes it with background and cost 15 points of held-out
    accuracy), written as a fixed ``MaxPool2d(4)`` so every exporter and quantizer
    knows it.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    widths = [3, 16, 32, 64, 128]
    for stage, (cin, cout) in enumerate(pairwise(widths)):
        stride = 2 if stage == 0 else 1
        layers[f"conv{stage}"] = nn.Conv2d(cin, cout, kernel_size=3, stride=stride,
                                           padding=1, bias=False)
        layers[f"bn{stage}"] = nn.BatchNorm2d(cout)
        layers[f"relu{stage}"] = nn.ReLU()
        if stage > 0:
            layers[f"pool{stage}"] = nn.MaxPool2d(2)
    layers["globalpool"] = nn.MaxPool2d(RECIPE.size // 16)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(widths[-1], 10)
    return nn.Sequential(layers)


def load() -> ZooModel:
    """The scene classifier, building its data set and training it on first use."""
    data_path = dataset_path(RECIPE)
    ensure_dataset(RECIPE, data_path)
    heldout = read_split(data_path, "heldout")
    heldout_x = to_input(torch.from_numpy(heldout.images))
    heldout_y = torch.from_numpy(heldout.labels)
    calibration = to_input(torch.from_numpy(read_split(data_path, "train",
                                                       rows=CALIBRATION_ROWS).images))
    with training.deterministic(TRAIN.seed, TRAIN.threads):
        module = build_cnn()
        key = training.weights_key(module, TRAIN,
                                 {"scenes": asdict(RECIPE), "layout": TRAIN_LAYOUT})
        training.load_or_train(module, training.weights_path("scene-cnn", key),
                             lambda m: _train(m, data_path))
        score = training.accuracy(module, heldout_x, heldout_y, batch_size=200)
    return ZooModel(
        name="scene-cnn", module=module, example_inputs=(heldout_x[:1].clone(),),
        input_names=("input",), output_names=("logits",),
        heldout=HeldOut(inputs=(heldout_x,), labels=heldout_y),
        calibration=(calibration,), metric="accuracy",
        description=(f"4-conv CNN (BatchNorm, ReLU, max-pool) on {RECIPE.size}x{RECIPE.size} "
                     "RGB scenes: real digits composited onto real photographs"),
        reported={"heldout_accuracy": score})


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` scenes -> float32 model inputs in [0, 1]."""
    return images.to(torch.float32) / 255.0


def _train(module: nn.Module, data_path: Path) -> None:
    train = read_split(data_path, "train")
    # torch's stubs omit Module.to's memory_format keyword, which it accepts at run time.
    module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    training.fit(module, torch.from_numpy(train.images), torch.from_numpy(train.labels),
               TRAIN, prepare=_to_channels_last_input)
    module.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]


def _to_channels_last_input(images: torch.Tensor) -> torch.Tensor:
    return to_input(images).contiguous(memory_format=torch.channels_last)


# --- the cached data set --------------------------------------------------------------


def dataset_path(recipe: SceneRecipe) -> Path:
    return cache_dir() / f"scene-data-{recipe.key()}.safetensors"


def ensure_dataset(recipe: SceneRecipe, path: Path) -> bool:
    """Build the scenes into ``path`` unless they are there; True when it built them."""
    if path.exists():
        return False
    started = time.perf_counter()
    split = digits.split_digits()
    photos = scene_data.load_photos(recipe.train_photos + recipe.heldout_photos)
    built = scene_data.build_dataset(
        recipe, photos, (split.train_images, split.train_labels),
        (split.heldout_images, split.heldout_labels))
    arrays = {}
    for name, part in built.items():
        arrays[f"{name}_images"] = part.images
        arrays[f"{name}_labels"] = part.labels
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(arrays, str(partial), metadata={"recipe": recipe.key()})
    os.replace(partial, path)
    log.info("built scene data set %s in %.1f s", path.name, time.perf_counter() - started)
    return True


def read_split(path: Path, split: str, rows: int | None = None) -> SceneSplit:
    """Read one split (or its first ``rows`` scenes) from a cached data set file."""
    if split not in _SPLITS:
        raise InvalidInput(f"unknown split {split!r}; use one of {_SPLITS}")
    try:
        with safe_open(str(path), framework="numpy") as file:
            images = file.get_slice(f"{split}_images")
            labels = file.get_slice(f"{split}_labels")
            end = images.get_shape()[0] if rows is None else rows
            return SceneSplit(images=np.ascontiguousarray(images[:end]),
                              labels=np.ascontiguousarray(labels[:end]))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(
            f"cached scene data set {path} cannot be read ({exc}); delete the file and "
            "load the model again to rebuild it") from exc
