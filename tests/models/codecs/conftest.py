"""Shared fixtures: scene-cnn and the cached learned codec the benchmark reports.

The codec is read from the cache (``edgeswarm bench compression`` or an earlier test run
trains it once, about a minute per β on two cores); tests that use it are marked slow.
"""

from __future__ import annotations

import pytest
import torch

from edgeswarm.models import zoo
from edgeswarm.models.codecs.learned import LearnedCodec
from edgeswarm.models.codecs.train import LearnedRecipe, load_or_train
from edgeswarm.models.zoo import ZooModel


@pytest.fixture(scope="session")
def scene() -> ZooModel:
    return zoo.load("scene-cnn")


@pytest.fixture(scope="session")
def learned(scene: ZooModel) -> LearnedCodec:
    codec = load_or_train([LearnedRecipe()], scene)[0]
    assert isinstance(codec, LearnedCodec)
    return codec


@pytest.fixture
def one_thread():
    """Codecs run as the bench runs them, on one torch thread (a pool of two threads makes
    a one-sample message 100x slower on a loaded two-core machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
