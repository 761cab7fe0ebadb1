"""The one codec interface: encode on the sender, decode on the receiver, estimate for the
planner.

Like hivemind's compression (``compress`` / ``extract`` / ``estimate_compression_ratio``),
a codec is small: :meth:`Codec.encode` turns a batch-first float32 array into bytes,
:meth:`Codec.decode` turns those bytes back into an array of the same shape, and
:meth:`Codec.estimate` costs a choice *without running it*, from the codec's
:class:`CodecProfile` (measured on real activations by
:func:`edgeswarm.models.codecs.profile.measure`). :meth:`Codec.spec` turns the profile
into the planner's :class:`~edgeswarm.placement.codecs.CodecSpec` for a device of a
given speed.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from edgeswarm.placement.codecs import CodecSpec
from edgeswarm.placement.errors import InvalidInput


class Estimate(NamedTuple):
    """What sending ``bytes_in`` raw activation bytes through a codec costs."""

    bytes_out: float
    encode_s: float
    decode_s: float


@dataclass(frozen=True)
class CodecProfile:
    """A codec's cost model, linear in the raw (fp32) activation bytes it is given.

    ``ratio`` is wire bytes / raw bytes; the times are seconds per raw byte on the
    machine named by ``measured_on`` (empty for a codec's analytic prior).
    """

    ratio: float
    encode_s_per_byte: float
    decode_s_per_byte: float
    measured_on: str = ""

    def __post_init__(self) -> None:
        if not self.ratio > 0:
            raise InvalidInput(f"codec profile: ratio {self.ratio} must be > 0")
        if self.encode_s_per_byte < 0 or self.decode_s_per_byte < 0:
            raise InvalidInput("codec profile: times per byte must be >= 0")


class Codec(ABC):
    """A feature codec for one cut edge.

    ``name`` is the codec family (``int8``, ``learned``, ...); ``setting`` its knob as a
    string (a quality, a rate weight β) or None; ``full_name`` (``name[:setting]``) is
    what plans and codec tables use. Inputs to :meth:`encode` are batch-first float32
    arrays; a pipeline sends one request's batch per message, and the benchmark's
    ``bytes_per_sample`` is the size of a one-sample message.
    """

    name: str = ""

    def __init__(self, setting: str | None = None, profile: CodecProfile | None = None) -> None:
        self.setting = setting
        self.profile = profile or self.prior()

    @property
    def full_name(self) -> str:
        return self.name if self.setting is None else f"{self.name}:{self.setting}"

    def __repr__(self) -> str:
        return f"<codec {self.full_name}>"

    @abstractmethod
    def encode(self, x: np.ndarray) -> bytes:
        """Bytes for the batch ``x`` (float32, batch-first)."""

    @abstractmethod
    def decode(self, data: bytes) -> np.ndarray:
        """The batch back from :meth:`encode`'s bytes; raises InvalidInput naming the
        codec when the bytes are not a payload of this codec."""

    @abstractmethod
    def prior(self) -> CodecProfile:
        """The profile assumed before one is measured."""

    def estimate(self, bytes_in: float) -> Estimate:
        """Wire bytes and encode/decode seconds for ``bytes_in`` raw bytes on the machine
        the profile was measured on, without running the codec."""
        p = self.profile
        return Estimate(bytes_in * p.ratio, bytes_in * p.encode_s_per_byte,
                        bytes_in * p.decode_s_per_byte)

    def spec(self, device_flops: float) -> CodecSpec:
        """The planner's cost model of this codec, scaled to devices by speed.

        ``device_flops`` is the FLOP/s of the machine the profile was measured on (as
        the agent measures it); encode and decode seconds per byte become FLOPs per
        byte, so a device half as fast takes twice as long.
        """
        if not device_flops > 0:
            raise InvalidInput(f"codec {self.full_name!r}: device_flops {device_flops} must "
                               "be > 0")
        p = self.profile
        return CodecSpec(self.full_name, min(1.0, p.ratio), p.encode_s_per_byte * device_flops,
                         p.decode_s_per_byte * device_flops)

    def with_profile(self, profile: CodecProfile) -> Codec:
        """This codec with a measured profile (a shallow copy; the codec is unchanged)."""
        other = copy.copy(self)
        other.profile = profile
        return other


def as_batch(codec: str, x: np.ndarray, min_dims: int = 1) -> np.ndarray:
    """``x`` as a C-contiguous float32 batch, or InvalidInput naming the codec."""
    arr = np.asarray(x)
    if arr.ndim < min_dims + 1:
        raise InvalidInput(f"codec {codec!r}: expected a batch-first array with at least "
                           f"{min_dims + 1} dimensions, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidInput(f"codec {codec!r}: expected floats, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)
