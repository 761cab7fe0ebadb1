"""Training toolkit for the zoo's classifiers: deterministic training, cached weights.

Weights are cached in :func:`~edgeswarm.models.zoo.cache.cache_dir` as safetensors (never
pickle) under a name that hashes the architecture and the training and data recipes
(:func:`weights_key`), so a changed recipe retrains and an unchanged one is read back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgeswarm.models.zoo.cache import cache_dir
from edgeswarm.placement.errors import ModelFileError

log = logging.getLogger("edgeswarm.models.zoo")

#: Bump when the meaning of a cached weights file changes without the recipe changing.
CACHE_FORMAT = 1


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
