"""Feature codecs for cut edges: encode on the sender, decode on the receiver, estimate for
the planner.

>>> import numpy as np
>>> from edgeswarm.models import codecs
>>> c = codecs.get("int8")
>>> x = np.ones((1, 16, 8, 8), dtype=np.float32)
>>> c.decode(c.encode(x)).shape
(1, 16, 8, 8)

Codecs are named ``name[:setting]``: ``none``, ``fp16``, ``int8`` (+ zstd), ``learned:β``
(a trained bottleneck with CompressAI's entropy model; trained and cached on first use),
and the input-image baselines ``png``, ``jpeg:quality``, ``webp:quality``. See
docs/compression.md.
"""

from __future__ import annotations

from collections.abc import Callable

from edgeswarm.models.codecs.base import Codec, CodecProfile, Estimate
from edgeswarm.models.codecs.profile import Measurement, codec_table, measure
from edgeswarm.placement.errors import InvalidInput

Factory = Callable[[str | None], Codec]


def _none(setting: str | None) -> Codec:
    from edgeswarm.models.codecs.simple import NoneCodec

    _no_setting("none", setting)
    return NoneCodec()


def _fp16(setting: str | None) -> Codec:
    from edgeswarm.models.codecs.simple import Fp16Codec

    _no_setting("fp16", setting)
    return Fp16Codec()


def _int8(setting: str | None) -> Codec:
    from edgeswarm.models.codecs.simple import Int8Codec

    _no_setting("int8", setting)
    return Int8Codec()


def _learned(setting: str | None) -> Codec:
    from edgeswarm.models.codecs.train import LearnedRecipe, load_or_train

    recipe = LearnedRecipe()
    if setting is not None:
        try:
            recipe = LearnedRecipe(beta=float(setting))
        except ValueError:
            raise InvalidInput(f"codec 'learned': β {setting!r} is not a number") from None
    return load_or_train([recipe])[0]


def _image(name: str) -> Factory:
    def make(setting: str | None) -> Codec:
        from edgeswarm.models.codecs.images import ImageCodec

        return ImageCodec(name, setting)

    return make


def _no_setting(name: str, setting: str | None) -> None:
    if setting is not None:
        raise InvalidInput(f"codec {name!r} takes no setting, got {setting!r}")


#: name -> factory(setting); factories import lazily (the learned codec needs torch and
#: CompressAI, the image codecs Pillow).
_REGISTRY: dict[str, Factory] = {
    "none": _none, "fp16": _fp16, "int8": _int8, "learned": _learned,
    "png": _image("png"), "jpeg": _image("jpeg"), "webp": _image("webp"),
}


def names() -> list[str]:
    return list(_REGISTRY)


def get(full_name: str) -> Codec:
    """The codec named ``name`` or ``name:setting`` (``jpeg:50``, ``learned:3e-05``)."""
    name, _, setting = full_name.partition(":")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise InvalidInput(f"unknown codec {name!r}; known: {', '.join(_REGISTRY)}") from None
    return factory(setting or None)


def register(name: str, factory: Factory) -> None:
    """Add a codec family (``factory(setting) -> Codec``) under ``name``."""
    if ":" in name or not name:
        raise InvalidInput(f"codec name {name!r} must be non-empty and contain no ':'")
    _REGISTRY[name] = factory


__all__ = ["Codec", "CodecProfile", "Estimate", "Measurement", "codec_table", "get",
           "measure", "names", "register"]
