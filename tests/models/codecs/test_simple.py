"""none, fp16 and int8: exactness, error bounds, refusal of bad bytes, planner costs."""

from __future__ import annotations

import numpy as np
import pytest

from edgeswarm.models import codecs
from edgeswarm.models.codecs import wire
from edgeswarm.models.codecs.base import CodecProfile
from edgeswarm.placement.errors import InvalidInput


def _activations(rng: np.random.Generator, shape=(3, 16, 8, 8)) -> np.ndarray:
    """ReLU'd Gaussians with a few large values, like a conv stack's activations."""
    x = np.maximum(rng.normal(0.0, 1.5, shape), 0.0).astype(np.float32)
    x.flat[::97] *= 20.0
    return x


def test_none_is_exact_bit_for_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1e3, (4, 5, 3)).astype(np.float32)
    x[0, 0, 0] = np.float32(1e-40)  # a subnormal survives too
    c = codecs.get("none")
    payload = c.encode(x)
    y = c.decode(payload)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.tobytes() == x.tobytes()
    assert len(payload) == x.nbytes + 2 + len(wire.shape_bytes(x.shape))


def test_fp16_relative_error_bound_and_half_the_bytes():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 100, (2, 32, 16, 16)).astype(np.float32)
    c = codecs.get("fp16")
    payload = c.encode(x)
    y = c.decode(payload)
    assert y.dtype == np.float32 and y.shape == x.shape
    # round-to-nearest in float16: relative error <= 2**-11 (normal range)
    err = np.abs(y - x)
    assert (err <= np.abs(x) * 2.0**-11 + 2.0**-24).all()
    assert err.max() > 0  # it is lossy: the bound is not vacuous
    assert len(payload) < x.nbytes / 2 + 16


def test_fp16_refuses_values_it_cannot_hold():
    x = np.array([[1.0, 70000.0]], dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"codec 'fp16'.*do not fit"):
        codecs.get("fp16").encode(x)


def test_int8_error_is_at_most_half_a_step_per_sample():
    rng = np.random.default_rng(2)
    x = _activations(rng)
    x[1] = -3.0 + x[1]  # samples with different ranges get their own scale
    c = codecs.get("int8")
    y = c.decode(c.encode(x))
    assert y.dtype == np.float32 and y.shape == x.shape
    for xs, ys in zip(x, y, strict=True):
        step = (xs.max() - xs.min()) / 255
        assert np.abs(ys - xs).max() <= step / 2 * (1 + 1e-5) + 1e-7
        assert np.abs(ys - xs).max() > step / 100  # really quantized


def test_int8_with_zstd_beats_a_quarter_on_sparse_activations():
    x = _activations(np.random.default_rng(3), (1, 32, 16, 16))
    payload = codecs.get("int8").encode(x)
    assert len(payload) < 0.25 * x.nbytes  # ReLU zeros compress below 8 bits a value


def test_int8_constant_and_empty_samples():
    c = codecs.get("int8")
    x = np.full((2, 4, 4), 7.5, dtype=np.float32)
    assert np.array_equal(c.decode(c.encode(x)), x)
    empty = np.zeros((0, 3), dtype=np.float32)
    assert c.decode(c.encode(empty)).shape == (0, 3)


def test_int8_refuses_nan():
    x = np.array([[1.0, np.nan]], dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"codec 'int8'.*NaN"):
        codecs.get("int8").encode(x)


@pytest.mark.parametrize("name", ["none", "fp16", "int8"])
def test_corrupt_bytes_raise_an_error_naming_the_codec(name):
    c = codecs.get(name)
    payload = c.encode(_activations(np.random.default_rng(4), (2, 4, 8, 8)))
    for bad in (payload[:-5], payload + b"\x00", b"", b"garbage bytes", payload[:3]):
        with pytest.raises(InvalidInput, match=f"codec '{name}': cannot decode"):
            c.decode(bad)


def test_bytes_of_another_codec_are_refused_by_name():
    x = np.ones((1, 8), dtype=np.float32)
    with pytest.raises(InvalidInput, match=r"codec 'int8'.*encoded by codec 'fp16'"):
        codecs.get("int8").decode(codecs.get("fp16").encode(x))


def test_corrupt_zstd_frame_is_reported():
    c = codecs.get("int8")
    payload = bytearray(c.encode(_activations(np.random.default_rng(5), (1, 4, 8, 8))))
    payload[-6:] = b"\xff" * 6
    with pytest.raises(InvalidInput, match="codec 'int8'"):
        c.decode(bytes(payload))


def test_inputs_must_be_float_batches():
    with pytest.raises(InvalidInput, match="batch-first"):
        codecs.get("none").encode(np.float32(3.0))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="expected floats"):
        codecs.get("none").encode(np.ones((2, 2), dtype=np.int64))


def test_estimate_and_spec_follow_the_profile():
    c = codecs.get("int8").with_profile(CodecProfile(0.1, 2e-9, 1e-9, "test"))
    assert codecs.get("int8").profile.ratio == 0.25  # with_profile copies
    est = c.estimate(32768)
    assert est.bytes_out == pytest.approx(3276.8)
    assert est.encode_s == pytest.approx(32768 * 2e-9)
    assert est.decode_s == pytest.approx(32768 * 1e-9)
    spec = c.spec(device_flops=5e10)
    assert spec.name == "int8" and spec.ratio == pytest.approx(0.1)
    # a device of 5e10 FLOP/s takes 2e-9 s a byte: 100 FLOPs a byte
    assert spec.encode_flops_per_byte == pytest.approx(100.0)
    assert spec.encode_s(32768, 5e10) == pytest.approx(est.encode_s)
    with pytest.raises(InvalidInput, match="device_flops"):
        c.spec(0.0)


def test_registry_names_and_settings():
    assert set(codecs.names()) >= {"none", "fp16", "int8", "learned", "png", "jpeg", "webp"}
    assert codecs.get("jpeg:50").full_name == "jpeg:50"
    with pytest.raises(InvalidInput, match="unknown codec 'zip'"):
        codecs.get("zip")
    with pytest.raises(InvalidInput, match="takes no setting"):
        codecs.get("int8:3")
    with pytest.raises(InvalidInput, match="no ':'"):
        codecs.register("a:b", lambda s: codecs.get("none"))
