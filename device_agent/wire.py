"""Tensors on the data-plane wire: raw bytes with a dtype and shape header.

One message carries a request id and a list of arrays. The layout (little-endian) is::

    header   magic b"ESW1" | version u16 | request id i64 | count u32
    tensor   dtype code u8 | ndim u8 | shape i64 * ndim | byte length u64
             zero padding to a multiple of 8 bytes | raw data

Dtypes come from a fixed allow-list (:data:`DTYPES`); ``bfloat16`` travels as its raw
16-bit patterns and comes back as ``ml_dtypes.bfloat16`` when that package is installed,
else as ``uint16`` holding the same bits. Decoding checks every count, dimension and length
against the message and the caps before it allocates anything, and raises
:class:`~edgeswarm.placement.errors.ProtocolError` naming the problem: a peer's bytes are
never trusted and never unpickled. No I/O here; :mod:`.dataplane` moves the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgeswarm.placement.errors import InvalidInput, ProtocolError

MAGIC = b"ESW1"
VERSION = 1
#: The request id of the message that tells a pipeline to stop.
SHUTDOWN = -1
#: Wire dtype codes, in code order (code = index + 1; 0 is never valid).
DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")
#: Largest tensor a message may carry (bytes) and most tensors and dimensions per message.
MAX_TENSOR_BYTES = 1 << 30
MAX_TENSORS = 1024
MAX_NDIM = 16
#: Largest whole message (a full set of tensors at the cap would never fit a device anyway).
MAX_MESSAGE_BYTES = 2 << 30

_HEADER = struct.Struct("<4sHqI")
_TENSOR = struct.Struct("<BB")
_LENGTH = struct.Struct("<Q")
_ALIGN = 8
_CODES = {name: code for code, name in enumerate(DTYPES, start=1)}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4,
             "int64": 8, "bool": 1}


def _bfloat16() -> np.dtype[Any] | None:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


_BF16 = _bfloat16()


def _numpy_dtype(name: str) -> np.dtype[Any]:
    if name == "bfloat16":
        return _BF16 if _BF16 is not None else np.dtype("<u2")
    return np.dtype(name).newbyteorder("<")


def _pad(offset: int) -> int:
    return -offset % _ALIGN


def encode(arrays: Sequence[np.ndarray], request_id: int) -> bytes:
    """One message holding ``arrays`` (any dtype of :data:`DTYPES`) and ``request_id``.

    Raises InvalidInput for a dtype off the allow-list, too many tensors or dimensions, or a
    tensor over :data:`MAX_TENSOR_BYTES`: the sender's own mistake, caught before sending.
    """
    if not -(1 << 63) <= request_id < (1 << 63):
        raise InvalidInput(f"request id {request_id} does not fit a signed 64-bit integer")
    if len(arrays) > MAX_TENSORS:
        raise InvalidInput(f"{len(arrays)} tensors in one message; at most {MAX_TENSORS}")
    parts: list[bytes | memoryview] = [_HEADER.pack(MAGIC, VERSION, request_id, len(arrays))]
    offset = _HEADER.size
    for i, raw_array in enumerate(arrays):
        array = np.asarray(raw_array)
        name = array.dtype.name
        if name not in _CODES:
            raise InvalidInput(f"tensor {i} has dtype {name}; the wire carries only "
                               f"{', '.join(DTYPES)}: cast it first")
        if array.ndim > MAX_NDIM:
            raise InvalidInput(f"tensor {i} has {array.ndim} dimensions; at most {MAX_NDIM}")
        if array.nbytes > MAX_TENSOR_BYTES:
            raise InvalidInput(f"tensor {i} is {array.nbytes} bytes; the cap is "
                               f"{MAX_TENSOR_BYTES} (MAX_TENSOR_BYTES): split it")
        if name != "bfloat16":  # ml_dtypes has one byte order; the others go little-endian
            array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        head = (_TENSOR.pack(_CODES[name], array.ndim)
                + struct.pack(f"<{array.ndim}q", *array.shape) + _LENGTH.pack(array.nbytes))
        offset += len(head)
        parts += [head, bytes(_pad(offset))]
        offset += _pad(offset) + array.nbytes
        parts.append(array.reshape(-1).view(np.uint8).data)
    return b"".join(parts)


class _Reader:
    """A cursor over a message that refuses to read past its end."""

    def __init__(self, raw: memoryview) -> None:
        self.raw = raw
        self.at = 0

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.raw) - self.at:
            raise ProtocolError(f"message truncated: {what} needs {n} bytes at offset "
                                f"{self.at}, only {len(self.raw) - self.at} left of "
                                f"{len(self.raw)}")
        chunk = self.raw[self.at:self.at + n]
        self.at += n
        return chunk

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[Any, ...]:
        return fmt.unpack(self.take(fmt.size, what))


def decode(raw: bytes | bytearray | memoryview) -> tuple[int, list[np.ndarray]]:
    """``(request_id, arrays)`` from one message; raises ProtocolError if it is malformed.

    The arrays share memory with ``raw`` (no copy): they are writable when ``raw`` is a
    writable buffer (a ``bytearray``), read-only when it is ``bytes``.
    """
    view = memoryview(raw).cast("B")
    if len(view) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(view)} bytes is over the cap of "
                            f"{MAX_MESSAGE_BYTES} (MAX_MESSAGE_BYTES)")
    reader = _Reader(view)
    magic, version, request_id, count = reader.unpack(_HEADER, "the header")
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}: the peer is "
                            "not an edgeswarm data plane or the stream is out of step")
    if version != VERSION:
        raise ProtocolError(f"wire version {version} is not supported (this agent speaks "
                            f"{VERSION}): run the same edgeswarm version on every device")
    if count > MAX_TENSORS:
        raise ProtocolError(f"message claims {count} tensors; at most {MAX_TENSORS}")
    arrays = [_decode_tensor(reader, i) for i in range(count)]
    if reader.at != len(view):
        raise ProtocolError(f"{len(view) - reader.at} trailing bytes after the last of "
                            f"{count} tensors")
    return request_id, arrays


def _decode_tensor(reader: _Reader, i: int) -> np.ndarray:
    code, ndim = reader.unpack(_TENSOR, f"tensor {i}'s header")
    if not 1 <= code <= len(DTYPES):
        raise ProtocolError(f"tensor {i} has unknown dtype code {code}; known: "
                            + ", ".join(f"{c}={n}" for n, c in _CODES.items()))
    name = DTYPES[code - 1]
    if ndim > MAX_NDIM:
        raise ProtocolError(f"tensor {i} claims {ndim} dimensions; at most {MAX_NDIM}")
    shape = struct.unpack(f"<{ndim}q", reader.take(8 * ndim, f"tensor {i}'s shape"))
    if any(d < 0 for d in shape):
        raise ProtocolError(f"tensor {i} has a negative dimension in shape {shape}")
    (length,) = reader.unpack(_LENGTH, f"tensor {i}'s byte length")
    if length > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor {i} claims {length} bytes; the cap is "
                            f"{MAX_TENSOR_BYTES} (MAX_TENSOR_BYTES)")
    expected = math.prod(shape) * _ITEMSIZE[name]  # exact: Python ints do not overflow
    if length != expected:
        raise ProtocolError(f"tensor {i} claims {length} bytes but shape {shape} of {name} "
                            f"needs {expected}")
    reader.take(_pad(reader.at), f"tensor {i}'s padding")
    data = reader.take(length, f"tensor {i}'s data ({name} {shape})")
    if name == "bool" and length and np.frombuffer(data, dtype=np.uint8).max() > 1:
        raise ProtocolError(f"tensor {i} is bool but holds bytes other than 0 and 1")
    return np.frombuffer(data, dtype=_numpy_dtype(name)).reshape(shape)
