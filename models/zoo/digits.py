"""digits-mlp and digits-cnn: classifiers on scikit-learn's bundled 8x8 handwritten digits.

The 1,797 digits are split once, stratified, 75 % train / 25 % held-out with a fixed
seed (:func:`split_digits`); ``scene-cnn`` reuses the same split so that its held-out
scenes only show held-out digits. Inputs are float32 in [0, 1]: ``(N, 64)`` for the MLP,
``(N, 1, 8, 8)`` for the CNN; outputs are logits ``(N, 10)``.

Training is deterministic and takes a few seconds. Weights are cached in
:func:`~edgeswarm.models.zoo.cache.cache_dir` as safetensors under a name that hashes the
architecture and the training recipe (:func:`weights_key`), so a changed recipe retrains
and an unchanged one is read back (the toolkit is in :mod:`~edgeswarm.models.zoo.training`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeswarm.models.zoo.spec import HeldOut, ZooModel
from edgeswarm.models.zoo.training import (
    TrainConfig,
    accuracy,
    deterministic,
    fit,
    load_or_train,
    weights_key,
    weights_path,
)

log = logging.getLogger("edgeswarm.models.zoo")

#: Number of training-split inputs handed out for int8 calibration.
CALIBRATION_ROWS = 256

SPLIT_SEED = 0
HELDOUT_FRACTION = 0.25


# --- the data -------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitSplit:
    """The fixed train / held-out split of scikit-learn's digits.

    Images are float32 ``(n, 8, 8)`` in [0, 1]; ``*_index`` are row numbers into
    ``sklearn.datasets.load_digits()`` so that callers can check the split is disjoint.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    train_index: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    heldout_index: np.ndarray


def split_digits(seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION) -> DigitSplit:
    """Split the digits, stratified by label, with a fixed seed (same answer every call)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    train_index, heldout_index = train_test_split(
        index, test_size=heldout_fraction, stratify=labels, random_state=seed)
    return DigitSplit(
        train_images=images[train_index], train_labels=labels[train_index],
        train_index=train_index,
        heldout_images=images[heldout_index], heldout_labels=labels[heldout_index],
        heldout_index=heldout_index)


# --- the two models -------------------------------------------------------------------

MLP_TRAIN = TrainConfig(epochs=40, batch_size=64, lr=3e-3, weight_decay=1e-4)
CNN_TRAIN = TrainConfig(epochs=30, batch_size=64, lr=3e-3, weight_decay=1e-4)


def build_mlp() -> nn.Sequential:
    """64 -> 128 -> 64 -> 10, ReLU between."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(64, 128)), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(128, 64)), ("relu2", nn.ReLU()),
        ("fc3", nn.Linear(64, 10)),
    ]))


def build_cnn() -> nn.Sequential:
    """Three 3x3 convs on the 8x8 image, two max-pools (8x8 -> 4x4 -> 2x2), two linear layers."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 32, kernel_size=3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(32, 64, kernel_size=3, padding=1)), ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("conv3", nn.Conv2d(64, 64, kernel_size=3, padding=1)), ("relu3", nn.ReLU()),
        ("pool3", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(64 * 2 * 2, 64)), ("relu4", nn.ReLU()),
        ("fc2", nn.Linear(64, 10)),
    ]))


def load_mlp() -> ZooModel:
    """The digits MLP; inputs ``(N, 64)`` float32 in [0, 1]."""
    return _load("digits-mlp", build_mlp, MLP_TRAIN, shape=(64,),
                 description="MLP 64-128-64-10 on scikit-learn's 8x8 digits, flattened")


def load_cnn() -> ZooModel:
    """The digits CNN; inputs ``(N, 1, 8, 8)`` float32 in [0, 1]."""
    return _load("digits-cnn", build_cnn, CNN_TRAIN, shape=(1, 8, 8),
                 description="3-conv CNN on scikit-learn's 8x8 digits")


def data_recipe(shape: tuple[int, ...]) -> dict[str, Any]:
    """What decides the training data of a digits model (part of its cache key)."""
    return {"source": "sklearn.load_digits", "scale": "x/16", "shape": list(shape),
            "split_seed": SPLIT_SEED, "heldout_fraction": HELDOUT_FRACTION}


def _load(name: str, build: Callable[[], nn.Module], config: TrainConfig,
          shape: tuple[int, ...], description: str) -> ZooModel:
    split = split_digits()
    train_x = torch.from_numpy(split.train_images).reshape(-1, *shape)
    train_y = torch.from_numpy(split.train_labels)
    heldout_x = torch.from_numpy(split.heldout_images).reshape(-1, *shape)
    heldout_y = torch.from_numpy(split.heldout_labels)
    with deterministic(config.seed, config.threads):
        module = build()
        path = weights_path(name, weights_key(module, config, data_recipe(shape)))
        load_or_train(module, path, lambda m: fit(m, train_x, train_y, config))
        score = accuracy(module, heldout_x, heldout_y)
    return ZooModel(
        name=name, module=module, example_inputs=(heldout_x[:1].clone(),),
        input_names=("input",), output_names=("logits",),
        heldout=HeldOut(inputs=(heldout_x,), labels=heldout_y),
        calibration=(train_x[:CALIBRATION_ROWS].clone(),), metric="accuracy",
        description=description, reported={"heldout_accuracy": score})
