"""Codecs that need no training: ``none`` (fp32), ``fp16`` and ``int8`` (+ zstd).

Payloads (after the two-byte header of :mod:`~edgeswarm.models.codecs.wire`):

- ``none``: shape, then the fp32 values little-endian: exact.
- ``fp16``: shape, then the values cast to float16: relative error at most 2**-11 for
  values within float16's range (|x| <= 65504); larger values are refused.
- ``int8``: shape, then one zstd frame holding, per sample, its minimum and step
  (float32) and its values quantized to 256 levels between its minimum and maximum:
  absolute error at most step / 2 = (max - min) / 510 per sample.
"""

from __future__ import annotations

import math

import numpy as np

from edgeswarm.models.codecs import wire
from edgeswarm.models.codecs.base import Codec, CodecProfile, as_batch
from edgeswarm.placement.errors import InvalidInput

#: Nominal speeds for the analytic priors, replaced by a measured profile in practice.
_PRIOR_S_PER_BYTE = 1.0 / 2e9
FP16_MAX = 65504.0
INT8_LEVELS = 255
#: zstd compression level of the int8 codec: 3 is zstd's default (fast, most of the gain).
ZSTD_LEVEL = 3


def _read_values(r: wire.Reader, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    raw = r.take(count * dtype.itemsize, f"{count} values of {dtype}")
    r.done()
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


class NoneCodec(Codec):
    """fp32 as it is: the baseline every other codec is compared with."""

    name = "none"

    def prior(self) -> CodecProfile:
        return CodecProfile(1.0, 0.0, 0.0)

    def encode(self, x: np.ndarray) -> bytes:
        arr = as_batch(self.name, x)
        return wire.header(self.name) + wire.shape_bytes(arr.shape) + arr.astype("<f4").tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        r = wire.Reader(self.name, data)
        values = _read_values(r, r.shape(), np.dtype("<f4"))
        return values.astype(np.float32)


class Fp16Codec(Codec):
    """Half precision: half the bytes, ~3 significant digits."""

    name = "fp16"

    def prior(self) -> CodecProfile:
        return CodecProfile(0.5, _PRIOR_S_PER_BYTE, _PRIOR_S_PER_BYTE)

    def encode(self, x: np.ndarray) -> bytes:
        arr = as_batch(self.name, x)
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if not peak <= FP16_MAX:
            raise InvalidInput(f"codec 'fp16': values up to {peak:g} do not fit in float16 "
                               f"(|x| <= {FP16_MAX:g}); use 'none' or 'int8' on this edge")
        return (wire.header(self.name) + wire.shape_bytes(arr.shape)
                + arr.astype("<f2").tobytes())

    def decode(self, data: bytes) -> np.ndarray:
        r = wire.Reader(self.name, data)
        return _read_values(r, r.shape(), np.dtype("<f2")).astype(np.float32)


class Int8Codec(Codec):
    """Per-sample affine 8-bit quantization, then zstd."""

    name = "int8"

    def __init__(self, setting: str | None = None, profile: CodecProfile | None = None,
                 level: int = ZSTD_LEVEL) -> None:
        super().__init__(setting, profile)
        import zstandard

        self._zstd = zstandard
        self.level = level

    def prior(self) -> CodecProfile:
        return CodecProfile(0.25, 4 * _PRIOR_S_PER_BYTE, 2 * _PRIOR_S_PER_BYTE)

    def encode(self, x: np.ndarray) -> bytes:
        arr = as_batch(self.name, x)
        if not np.isfinite(arr).all():
            raise InvalidInput("codec 'int8': the activation holds NaN or infinite values")
        flat = arr.reshape(len(arr), math.prod(arr.shape[1:]))
        empty = np.zeros(len(flat), dtype=np.float32)
        lo = flat.min(axis=1) if flat.size else empty
        hi = flat.max(axis=1) if flat.size else empty
        step = ((hi - lo) / INT8_LEVELS).astype(np.float32)
        safe = np.where(step > 0, step, np.float32(1.0))
        q = np.rint((flat - lo[:, None]) / safe[:, None])
        q = np.clip(q, 0, INT8_LEVELS).astype(np.uint8)
        body = (np.stack([lo.astype(np.float32), step], axis=1).astype("<f4").tobytes()
                + q.tobytes())
        frame = self._zstd.ZstdCompressor(level=self.level).compress(body)
        return wire.header(self.name) + wire.shape_bytes(arr.shape) + frame

    def decode(self, data: bytes) -> np.ndarray:
        r = wire.Reader(self.name, data)
        shape = r.shape()
        if not shape:
            r.fail("the shape has no batch dimension")
        n, per = shape[0], math.prod(shape[1:])
        expected = n * 8 + n * per
        frame = r.rest()
        try:
            declared = self._zstd.frame_content_size(frame)
            if declared != expected:
                r.fail(f"the zstd frame declares {declared} bytes, the shape {shape} needs "
                       f"{expected}")
            stream = self._zstd.ZstdDecompressor().decompressobj()
            body = stream.decompress(frame)
        except self._zstd.ZstdError as exc:
            r.fail(f"the zstd frame is corrupt ({exc})")
        if not stream.eof:
            r.fail("the zstd frame is truncated")
        if stream.unused_data:
            r.fail(f"{len(stream.unused_data)} unexpected bytes after the zstd frame")
        if len(body) != expected:
            r.fail(f"the zstd frame holds {len(body)} bytes, the shape {shape} needs "
                   f"{expected}")
        params = np.frombuffer(body[:n * 8], dtype="<f4").reshape(n, 2)
        q = np.frombuffer(body[n * 8:], dtype=np.uint8).reshape(n, per)
        out = params[:, :1] + q.astype(np.float32) * params[:, 1:]
        return out.astype(np.float32).reshape(shape)
