"""The model zoo: real models on real data, each loaded by name.

>>> from edgeswarm.models import zoo
>>> m = zoo.load("digits-cnn")
>>> m.module(*m.example_inputs).shape
torch.Size([1, 10])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from edgeswarm.models.zoo.spec import HeldOut, Metric, ZooModel
from edgeswarm.placement.errors import UnknownModel

# name -> ("module:function", one-line description). Loaders import lazily so that
# asking for one model never imports another's dependencies.
_REGISTRY: dict[str, tuple[str, str]] = {
    "digits-mlp": ("edgeswarm.models.zoo.digits:load_mlp",
                   "MLP classifier on scikit-learn's 8x8 handwritten digits"),
    "digits-cnn": ("edgeswarm.models.zoo.digits:load_cnn",
                   "small CNN classifier on scikit-learn's 8x8 handwritten digits"),
    "scene-cnn": ("edgeswarm.models.zoo.scene:load",
                  "CNN on 64x64 RGB scenes: real digits composited onto real photographs"),
    "minilm": ("edgeswarm.models.zoo.minilm:load",
               "all-MiniLM-L6-v2 sentence encoder (22.7M params), real weights"),
    "smollm2": ("edgeswarm.models.zoo.smollm2:load",
                "SmolLM2-135M-Instruct causal LM (Llama architecture) from GGUF"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def describe(name: str) -> str:
    return _entry(name)[1]


def load(name: str) -> ZooModel:
    """Load a zoo model by name (training and caching it on first use where needed)."""
    target = _entry(name)[0]
    module_name, func_name = target.split(":")
    loader: Callable[[], ZooModel] = getattr(importlib.import_module(module_name), func_name)
    return loader()


def _entry(name: str) -> tuple[str, str]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownModel(
            f"unknown model {name!r}: the zoo has {', '.join(_REGISTRY)} "
            "(or pass a path to an .onnx file)") from None


__all__ = ["HeldOut", "Metric", "ZooModel", "describe", "load", "names"]
