"""The bytes a codec puts on the wire: a two-byte header, varints, and a strict reader.

Every payload starts with ``MAGIC`` and the codec's one-byte tag, so bytes handed to the
wrong codec (or not from a codec at all) are refused with a message naming both. The
rest is the codec's own layout, written with unsigned LEB128 varints and read back by a
:class:`Reader` that raises :class:`~edgeswarm.placement.errors.InvalidInput` naming
the codec on any short, long or malformed field. Pure: no I/O, no torch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NoReturn

from edgeswarm.placement.errors import InvalidInput

MAGIC = 0xE5
#: One tag per codec; a payload carries its codec's tag after ``MAGIC``.
TAGS: dict[str, int] = {
    "none": 1, "fp16": 2, "int8": 3, "learned": 4, "png": 5, "jpeg": 6, "webp": 7,
}
_NAMES = {tag: name for name, tag in TAGS.items()}
#: The most dimensions, and the largest dimension, a payload may declare.
MAX_DIMS = 8
MAX_DIM = 1 << 24


def header(codec: str) -> bytes:
    return bytes((MAGIC, TAGS[codec]))


def varint(n: int) -> bytes:
    """Unsigned LEB128."""
    if n < 0:
        raise InvalidInput(f"varint of negative number {n}")
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def shape_bytes(shape: Sequence[int]) -> bytes:
    return varint(len(shape)) + b"".join(varint(int(d)) for d in shape)


class Reader:
    """Reads one codec's payload front to back; every failure names the codec."""

    def __init__(self, codec: str, data: bytes, label: str | None = None) -> None:
        self.codec = label or codec
        self.data = memoryview(data)
        self.pos = 0
        if len(data) < 2 or data[0] != MAGIC:
            self.fail("it does not start with an edgeswarm codec header")
        tag = data[1]
        if tag != TAGS[codec]:
            other = _NAMES.get(tag)
            made_by = f"codec {other!r}" if other else f"an unknown codec (tag {tag})"
            self.fail(f"it was encoded by {made_by}; decode it with the codec that made it")
        self.pos = 2

    def fail(self, why: str) -> NoReturn:
        raise InvalidInput(f"codec {self.codec!r}: cannot decode the payload: {why}")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            self.fail(f"{what}: needs {n} bytes, {len(self.data) - self.pos} left "
                      f"(truncated or corrupt)")
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def varint(self, what: str, limit: int = MAX_DIM) -> int:
        n = shift = 0
        while True:
            if self.pos >= len(self.data):
                self.fail(f"{what}: ends inside a number (truncated)")
            byte = self.data[self.pos]
            self.pos += 1
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 35:
                self.fail(f"{what}: number too long (corrupt)")
        if n > limit:
            self.fail(f"{what} = {n} exceeds {limit} (corrupt)")
        return n

    def shape(self, what: str = "shape") -> tuple[int, ...]:
        ndim = self.varint(f"{what} rank", MAX_DIMS)
        return tuple(self.varint(f"{what}[{i}]") for i in range(ndim))

    def float32(self, what: str) -> float:
        (value,) = struct.unpack("<f", self.take(4, what))
        return float(value)

    def rest(self) -> bytes:
        out = bytes(self.data[self.pos:])
        self.pos = len(self.data)
        return out

    def done(self) -> None:
        extra = len(self.data) - self.pos
        if extra:
            self.fail(f"{extra} unexpected bytes after the end (corrupt or concatenated)")
