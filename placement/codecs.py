"""Feature codecs as the planner costs them, without running them.

A codec on a cut edge encodes the activation on the sending device, carries
``ratio`` × its bytes over the link, and decodes on the receiving device. The planner
only needs the cost model; the codecs themselves live in ``edgeswarm.models``.
Compute costs are FLOPs per activation byte, so a slow device pays more.

Most codecs work on any activation. A *learned* codec is trained for one cut of one
model (its encoder takes that activation's shape, the receiver's layers are fine-tuned
for it), so its spec names the task edges it is valid on (``edges``) and planners offer
it there only (:meth:`~edgeswarm.placement.problem.Problem.codec_allowed`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from edgeswarm.placement.errors import InvalidInput


@dataclass(frozen=True)
class CodecSpec:
    name: str
    #: compressed bytes / raw bytes
    ratio: float
    encode_flops_per_byte: float
    decode_flops_per_byte: float
    #: The task edges ``(src, dst)`` it is valid on; None: every edge.
    edges: frozenset[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise InvalidInput(f"codec {self.name!r}: ratio {self.ratio} must be in (0, 1]")
        if self.edges is not None:
            object.__setattr__(self, "edges", _edge_set(self.name, self.edges))

    def allows(self, src: str, dst: str) -> bool:
        """Whether the codec may go on the task edge ``src -> dst``."""
        return self.edges is None or (src, dst) in self.edges

    def only_on(self, edges: Iterable[tuple[str, str]]) -> CodecSpec:
        """This spec, valid on ``edges`` only."""
        return CodecSpec(self.name, self.ratio, self.encode_flops_per_byte,
                         self.decode_flops_per_byte, _edge_set(self.name, edges))

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


def _edge_set(name: str, edges: Iterable[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for edge in edges:
        if (not isinstance(edge, (tuple, list)) or len(edge) != 2
                or not all(isinstance(t, str) for t in edge)):
            raise InvalidInput(f"codec {name!r}: edges must be (src task, dst task) pairs, "
                               f"got {edge!r}")
        out.add((edge[0], edge[1]))
    if not out:
        raise InvalidInput(f"codec {name!r}: an edge restriction must name at least one edge "
                           f"(None: every edge)")
    return frozenset(out)


def codec(name: str, table: Mapping[str, CodecSpec] = DEFAULT_CODECS) -> CodecSpec:
    try:
        return table[name]
    except KeyError:
        raise InvalidInput(f"unknown codec {name!r}; known: {', '.join(table)}") from None
