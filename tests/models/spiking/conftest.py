"""Shared fixtures: the ReLU zoo models and their conversions, loaded once per session."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from edgeswarm.models import zoo
from edgeswarm.models.spiking import SpikingNetwork, convert
from edgeswarm.models.zoo import ZooModel


@pytest.fixture(scope="session")
def mlp() -> ZooModel:
    return zoo.load("digits-mlp")


@pytest.fixture(scope="session")
def cnn() -> ZooModel:
    return zoo.load("digits-cnn")


@pytest.fixture(scope="session")
def mlp_net(mlp: ZooModel) -> SpikingNetwork:
    return convert(mlp.module, mlp.calibration[0])


@pytest.fixture(scope="session")
def cnn_net(cnn: ZooModel) -> SpikingNetwork:
    return convert(cnn.module, cnn.calibration[0])


@pytest.fixture(scope="session")
def ann_accuracy() -> Callable[[ZooModel, int], float]:
    """The ANN's accuracy on the first ``n`` held-out inputs."""
    def score(model: ZooModel, n: int) -> float:
        x, y = model.heldout.inputs[0][:n], model.heldout.labels
        assert y is not None
        with torch.inference_mode():
            return float((model.module(x).argmax(-1) == y[:n]).double().mean())
    return score
