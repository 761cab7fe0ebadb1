"""Feature codecs as the planner costs them, without running them.

A codec on a cut edge encodes the activation on the sending device, carries
``ratio`` × its bytes over the link, and decodes on the receiving device. The planner
only needs the cost model; the codecs themselves live in ``edgeswarm.models``.
Compute costs are FLOPs per activation byte, so a slow device pays more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgeswarm.placement.errors import InvalidInput


@dataclass(frozen=True)
class CodecSpec:
    name: str
    #: compressed bytes / raw bytes
    ratio: float
    encode_flops_per_byte: float
    decode_flops_per_byte: float

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise InvalidInput(f"codec {self.name!r}: ratio {self.ratio} must be in (0, 1]")

    def wire_bytes(self, nbytes: float) -> float:
        return nbytes * self.ratio

    def encode_s(self, nbytes: float, device_flops: float) -> float:
        return nbytes * self.encode_flops_per_byte / device_flops

    def decode_s(self, nbytes: float, device_flops: float) -> float:
        return nbytes * self.decode_flops_per_byte / device_flops


NONE = CodecSpec("none", 1.0, 0.0, 0.0)

#: Codecs every device supports. fp16 and int8 cast/quantize fp32 activations (a few
#: operations per element); "bottleneck" stands for a learned encoder with entropy
#: coding, whose measured profile replaces this one once it is trained.
DEFAULT_CODECS: Mapping[str, CodecSpec] = {
    "none": NONE,
    "fp16": CodecSpec("fp16", 0.5, 0.5, 0.5),
    "int8": CodecSpec("int8", 0.25, 1.0, 0.5),
    "bottleneck": CodecSpec("bottleneck", 1 / 16, 64.0, 64.0),
}


def codec(name: str, table: Mapping[str, CodecSpec] = DEFAULT_CODECS) -> CodecSpec:
    try:
        return table[name]
    except KeyError:
        raise InvalidInput(f"unknown codec {name!r}; known: {', '.join(table)}") from None
