"""Codecs as a deployment ships them: a name in the manifest, and a learned codec's files.

A device loads the codec of a cut edge with :func:`load`. ``fp16`` and ``int8`` need
nothing but their name; a ``learned`` codec is read from the two artifact files the
manifest names (weights ``.safetensors`` and description ``.json``, verified by sha256
before they get here) and is never trained on a device: without its files it is refused.
``none`` is no codec at all (the activation travels as it is), and the input-image codecs
(``png``, ``jpeg``, ``webp``) code images, not activations, so they are refused on a cut.
:func:`artifact_files` is the other end: the files a device needs for a codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgeswarm.models.codecs.base import Codec
from edgeswarm.placement.errors import InvalidInput

#: The codec families a cut edge may carry.
FEATURE_CODECS = ("none", "fp16", "int8", "learned")
#: Families a device loads from artifact files rather than by name alone.
WITH_FILES = ("learned",)


def family(name: str) -> str:
    """``int8`` for ``int8``, ``learned`` for ``learned:1e-05``."""
    return name.partition(":")[0]


def artifact_files(codec: Codec) -> tuple[Path, ...]:
    """The files a device needs to load ``codec`` (none but a learned codec's two)."""
    if codec.name not in WITH_FILES:
        return ()
    files: tuple[Path, Path] | None = getattr(codec, "files", None)
    if files is None:
        raise InvalidInput(f"codec {codec.full_name!r} was not read from an artifact, so it "
                           f"cannot be shipped; save it and load it with load_artifact")
    return files


def load(name: str, files: Sequence[Path] = ()) -> Codec:
    """The codec ``name`` as a device runs it, from ``files`` for a learned codec.

    Raises InvalidInput for an unknown or non-feature codec, for files given to a codec
    that takes none, for a learned codec without its two files or whose files hold
    another β; ModelFileError when the files are corrupt.
    """
    from edgeswarm.models import codecs

    kind = family(name)
    if kind not in FEATURE_CODECS:
        known = ", ".join(c for c in FEATURE_CODECS if c != "none")
        if kind in codecs.names():
            raise InvalidInput(f"codec {name!r} codes input images, not activations; a cut "
                               f"edge carries one of {known}")
        raise InvalidInput(f"unknown codec {name!r}; a cut edge carries one of {known}")
    if kind not in WITH_FILES:
        if files:
            raise InvalidInput(f"codec {name!r} takes no artifact files, got {len(files)}")
        return codecs.get(name)
    by_suffix = {Path(f).suffix: Path(f) for f in files}
    if len(files) != 2 or set(by_suffix) != {".safetensors", ".json"}:
        raise InvalidInput(f"codec {name!r} needs its two artifact files (weights "
                           f".safetensors and description .json), got "
                           f"{[Path(f).name for f in files]}")
    from edgeswarm.models.codecs.learned import load_files

    codec = load_files(by_suffix[".safetensors"], by_suffix[".json"])
    if name != kind and not _same_setting(name.partition(":")[2], codec.setting):
        raise InvalidInput(f"codec {name!r}: the artifact holds {codec.full_name!r}; ship "
                           f"the artifact the plan names")
    return codec


def _same_setting(wanted: str, have: str | None) -> bool:
    try:
        return have is not None and float(wanted) == float(have)
    except ValueError:
        return wanted == have
