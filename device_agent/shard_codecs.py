"""Feature codecs on a shard's network edges: encode what it sends, decode what it receives.

A manifest shard may name a codec for each value it sends (``send_codecs``, one per output)
and receives (``recv_codecs``, one per input); ``none`` leaves a value as it is. Encoded, a
value travels as one ``uint8`` array holding the codec's payload
(:mod:`edgeswarm.models.codecs`); the receiving shard decodes it back to float32 before it
runs. Only values that cross the network are coded: a hand-off between two shards of one
device stays as it is.

A learned codec's files are artifacts like the shard's own: :func:`artifacts` lists them,
the agent fetches and verifies them (sha256 and size) and hands them in by
:func:`file_key`. Loading raises InvalidInput for an unknown codec or a malformed codec
list, ModelFileError for corrupt codec files; a payload that does not decode raises
InvalidInput naming the shard, the input and the codec.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import numpy as np

from edgeswarm.device_agent.manifest import Artifact, CodecRef, Shard
from edgeswarm.placement.errors import InvalidInput, ProtocolError

if TYPE_CHECKING:
    from edgeswarm.models.codecs import Codec

Arrays = list[np.ndarray]


def file_key(artifact: Artifact) -> str:
    """The key of a codec artifact's local file in the executor's ``files`` (shard ids
    cannot contain ':', so it never meets one)."""
    return f"codec:{artifact.sha256}"


def artifacts(shards: Sequence[Shard]) -> Iterator[Artifact]:
    """Every codec artifact the shards name, each once."""
    seen: set[str] = set()
    for shard in shards:
        for ref in (*(shard.send_codecs or ()), *(shard.recv_codecs or ())):
            for art in ref.artifacts:
                if art.sha256 not in seen:
                    seen.add(art.sha256)
                    yield art


class ShardCodecs:
    """The loaded codecs of one shard (None where a value travels as it is)."""

    def __init__(self, shard: str, send: Sequence[Codec | None] | None,
                 recv: Sequence[Codec | None] | None) -> None:
        self.shard = shard
        self.send = list(send) if send is not None else None
        self.recv = list(recv) if recv is not None else None

    @classmethod
    def load(cls, shard: Shard, files: Mapping[str, Path]) -> ShardCodecs:
        """The codecs ``shard`` names, learned ones from their fetched files."""
        loaded: dict[str, Codec | None] = {}

        def one(ref: CodecRef, where: str) -> Codec | None:
            if ref.name == "none":
                if ref.artifacts:
                    raise InvalidInput(f"shard {shard.id!r} {where}: codec 'none' takes no "
                                       "artifacts")
                return None
            key = ref.model_dump_json()
            if key not in loaded:
                loaded[key] = _load(shard.id, where, ref, files)
            return loaded[key]

        send = [one(r, f"output {i}") for i, r in enumerate(shard.send_codecs or ())]
        recv = [one(r, f"input {i}") for i, r in enumerate(shard.recv_codecs or ())]
        return cls(shard.id, send if shard.send_codecs is not None else None,
                   recv if shard.recv_codecs is not None else None)

    def encode(self, outputs: Arrays) -> Arrays:
        """``outputs`` as they go to another rank: each coded value as its payload bytes."""
        if self.send is None:
            return outputs
        if len(outputs) != len(self.send):
            self._mismatch(f"{len(outputs)} outputs", f"send_codecs names {len(self.send)}")
        return [o if c is None else np.frombuffer(c.encode(o), dtype=np.uint8)
                for o, c in zip(outputs, self.send, strict=True)]

    def decode(self, arrays: Arrays, first: int) -> Arrays:
        """The shard's inputs ``first``, ``first + 1``, ... as received from another rank,
        decoded."""
        if self.recv is None:
            return arrays
        if first + len(arrays) > len(self.recv):
            self._mismatch(f"at least {first + len(arrays)} inputs",
                           f"recv_codecs names {len(self.recv)}")
        out = []
        for i, a in enumerate(arrays, start=first):
            codec = self.recv[i]
            if codec is None:
                out.append(a)
                continue
            if a.dtype != np.uint8 or a.ndim != 1:
                raise ProtocolError(f"shard {self.shard!r}: input {i} should be a "
                                    f"{codec.full_name!r} payload (uint8 bytes), got "
                                    f"{a.dtype} {tuple(a.shape)}: the sender did not encode "
                                    f"it; redeploy both ends from one manifest")
            try:
                out.append(codec.decode(a.tobytes()))
            except InvalidInput as exc:
                raise InvalidInput(f"shard {self.shard!r}, input {i}: {exc}") from None
        return out

    def _mismatch(self, have: str, named: str) -> NoReturn:
        raise ProtocolError(f"shard {self.shard!r} has {have} but its {named}; the manifest "
                            "does not match the shard's artifact")


def _load(shard: str, where: str, ref: CodecRef, files: Mapping[str, Path]) -> Codec:
    from edgeswarm.models.codecs.deploy import load

    paths = []
    for art in ref.artifacts:
        path = files.get(file_key(art))
        if path is None:
            raise InvalidInput(f"shard {shard!r} {where}: codec artifact {art.name!r} was not "
                               "fetched: fetch every codec artifact first")
        paths.append(path)
    try:
        return load(ref.name, paths)
    except InvalidInput as exc:
        raise InvalidInput(f"shard {shard!r} {where}: {exc}") from None
