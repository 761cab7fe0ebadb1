"""digits-mlp and digits-cnn: classifiers on scikit-learn's bundled 8x8 handwritten digits.

The 1,797 digits are split once, stratified, 75 % train / 25 % held-out with a fixed
seed (:func:`split_digits`); ``scene-cnn`` reuses the same split so that its held-out
scenes only show held-out digits. Inputs are float32 in [0, 1]: ``(N, 64)`` for the MLP,
``(N, 1, 8, 8)`` for the CNN; outputs are logits ``(N, 10)``.

Training is deterministic and takes a few seconds. Weights are cached in
:func:`~edgeswarm.models.zoo.cache.cache_dir` as safetensors under a name that hashes the
architecture and the training recipe (:func:`weights_key`), so a changed recipe retrains
and an unchanged one is read back. This module also holds the small training toolkit
(:class:`TrainConfig`, :func:`fit`, :func:`load_or_train`) that ``scene-cnn`` uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgeswarm.models.zoo.cache import cache_dir
from edgeswarm.models.zoo.spec import HeldOut, ZooModel
from edgeswarm.placement.errors import ModelFileError

log = logging.getLogger("edgeswarm.models.zoo")

#: Bump when the meaning of a cached weights file changes without the recipe changing.
CACHE_FORMAT = 1
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


# --- training toolkit (shared with scene-cnn) -----------------------------------------


@dataclass(frozen=True)
class TrainConfig:
    """How a zoo classifier is trained: AdamW with a one-cycle learning rate."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int = 0
    #: torch threads while training: fixed, so the weights do not depend on the host.
    threads: int = 1


@contextmanager
def deterministic(seed: int, threads: int = 1) -> Iterator[None]:
    """Seed torch and pin threads and algorithms, restoring the caller's settings after."""
    saved_threads = torch.get_num_threads()
    strict = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(strict)
            torch.set_num_threads(saved_threads)


def fit(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: TrainConfig,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Train ``module`` in place with cross-entropy; the batch order is fixed by the seed.

    ``prepare`` maps a batch of stored inputs to model inputs (e.g. uint8 -> float);
    it keeps large data sets compact in memory. Call inside :func:`deterministic`.
    """
    order = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = -(-len(labels) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    for _ in range(config.epochs):
        for rows in torch.randperm(len(labels), generator=order).split(config.batch_size):
            batch = inputs[rows] if prepare is None else prepare(inputs[rows])
            optimizer.zero_grad(set_to_none=True)
            loss_fn(module(batch), labels[rows]).backward()
            optimizer.step()
            schedule.step()
    module.eval()


@torch.no_grad()
def accuracy(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of ``module`` (in eval mode) on ``inputs``."""
    module.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = module(inputs[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def weights_key(module: nn.Module, config: TrainConfig, data: dict[str, Any]) -> str:
    """Hash of the architecture, the training recipe and the data recipe."""
    recipe = {"format": CACHE_FORMAT, "architecture": repr(module),
              "train": asdict(config), "data": data}
    blob = json.dumps(recipe, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def weights_path(name: str, key: str) -> Path:
    return cache_dir() / f"{name}-{key}.safetensors"


def load_or_train(module: nn.Module, path: Path, train: Callable[[nn.Module], None]) -> bool:
    """Fill ``module`` from the safetensors file at ``path``, training and saving it if absent.

    Returns True when it trained. The file is written atomically, so a crash or a
    concurrent loader never leaves half a file behind.
    """
    if path.exists():
        module.load_state_dict(_read_weights(path))
        module.eval()
        return False
    started = time.perf_counter()
    train(module)
    log.info("trained %s in %.1f s", path.name, time.perf_counter() - started)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(state, str(partial))
    os.replace(partial, path)
    module.eval()
    return True


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelFileError(
            f"cached weights {path} cannot be read ({exc}); delete the file and load the "
            "model again to retrain it") from exc


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
