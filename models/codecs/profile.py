"""Measuring codecs on real activations, and the planner's codec table built from them.

:func:`measure` runs a codec on real samples one at a time (a pipeline sends one
request's batch per message) and returns the decoded samples with the bytes and the
seconds they took; :meth:`Measurement.profile` turns that into the codec's
:class:`~edgeswarm.models.codecs.base.CodecProfile`. :func:`codec_table` turns measured
codecs into the :class:`~edgeswarm.placement.codecs.CodecSpec` table that
:class:`~edgeswarm.placement.problem.Problem` takes as ``codec_table``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from edgeswarm.models.codecs.base import Codec, CodecProfile
from edgeswarm.placement.codecs import DEFAULT_CODECS, CodecSpec
from edgeswarm.placement.errors import InvalidInput

Clock = Callable[[], float]
#: The placeholder for a learned codec in placement's default table; a measured learned
#: codec replaces it.
PLACEHOLDER = "bottleneck"


@dataclass(frozen=True)
class Measurement:
    """One codec on ``n`` samples, each sent as its own message."""

    codec: str
    n: int
    raw_bytes_per_sample: int
    bytes_per_sample: float
    #: median seconds to encode / decode one sample
    encode_s: float
    decode_s: float
    decoded: np.ndarray

    def profile(self, measured_on: str = "") -> CodecProfile:
        raw = self.raw_bytes_per_sample
        return CodecProfile(self.bytes_per_sample / raw, self.encode_s / raw,
                            self.decode_s / raw, measured_on)


def measure(codec: Codec, samples: np.ndarray, clock: Clock = time.perf_counter,
            timed: int | None = None) -> Measurement:
    """Encode and decode every sample of ``samples`` (float32, batch-first) on its own.

    All samples are coded (the decoded batch is returned for scoring); the first
    ``timed`` of them (all when None) are timed, each call on its own.
    """
    if len(samples) == 0:
        raise InvalidInput(f"measuring codec {codec.full_name!r} needs at least one sample")
    arr = np.ascontiguousarray(samples, dtype=np.float32)
    limit = len(arr) if timed is None else max(1, min(timed, len(arr)))
    sizes, enc, dec, out = [], [], [], []
    codec.decode(codec.encode(arr[:1]))  # warm up: first calls allocate
    for i in range(len(arr)):
        t0 = clock()
        payload = codec.encode(arr[i:i + 1])
        t1 = clock()
        out.append(codec.decode(payload))
        t2 = clock()
        sizes.append(len(payload))
        if i < limit:
            enc.append(t1 - t0)
            dec.append(t2 - t1)
    return Measurement(codec.full_name, len(arr), int(arr[0].nbytes),
                       float(np.mean(sizes)), statistics.median(enc), statistics.median(dec),
                       np.concatenate(out))


def codec_table(codecs: Iterable[Codec], device_flops: float,
                base: Mapping[str, CodecSpec] = DEFAULT_CODECS) -> dict[str, CodecSpec]:
    """The planner's codec table: ``base`` with each codec's spec (by ``full_name``) from
    its profile, measured on a machine of ``device_flops`` FLOP/s.

    A learned codec replaces ``base``'s analytic placeholder (``bottleneck``). Pass the
    result as ``Problem(graph, cluster, codec_table=...)``; the search policy then
    switches between these codecs on cut edges.
    """
    table = dict(base)
    for c in codecs:
        table[c.full_name] = c.spec(device_flops)
        if c.name == "learned":
            table.pop(PLACEHOLDER, None)
    return table


def profiled(codecs: Iterable[tuple[Codec, Measurement]], measured_on: str) -> list[Codec]:
    """Each codec with the profile of its measurement."""
    return [c.with_profile(m.profile(measured_on)) for c, m in codecs]
