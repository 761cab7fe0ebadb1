"""Input codecs: PNG is exact on 8-bit images, JPEG/WebP are close, bad bytes are refused."""

from __future__ import annotations

import numpy as np
import pytest

from edgeswarm.models import codecs
from edgeswarm.models.codecs import wire
from edgeswarm.placement.errors import InvalidInput


def _images(n: int = 3, size: int = 32) -> np.ndarray:
    """8-bit colour images like camera crops (gradients, a square, sensor noise), as
    floats in [0, 1]."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        out[i, 0], out[i, 1], out[i, 2] = xx, yy, (xx + yy + i / n) % 1.0
        out[i, :, 8:16, 8:16] = (i + 1) / (n + 1)
    out += rng.normal(0.0, 0.02, out.shape)
    return np.rint(np.clip(out, 0, 1) * 255) / np.float32(255)


def test_png_is_exact_on_8_bit_images():
    x = _images()
    c = codecs.get("png")
    y = c.decode(c.encode(x))
    assert y.shape == x.shape and y.dtype == np.float32
    assert np.array_equal(y, x)


@pytest.mark.parametrize("name", ["jpeg:90", "webp:90"])
def test_lossy_codecs_are_close_and_smaller(name):
    x = _images()
    c = codecs.get(name)
    payload = c.encode(x)
    y = c.decode(payload)
    assert np.abs(y - x).mean() < 0.04  # the sensor noise (std 0.02) is what they drop
    assert len(payload) < len(codecs.get("png").encode(x))


def test_lower_quality_means_fewer_bytes():
    x = _images()
    assert len(codecs.get("jpeg:25").encode(x)) < len(codecs.get("jpeg:95").encode(x))
    assert len(codecs.get("webp:25").encode(x)) < len(codecs.get("webp:95").encode(x))


def test_settings_are_checked():
    with pytest.raises(InvalidInput, match="outside 1-95"):
        codecs.get("jpeg:99")
    with pytest.raises(InvalidInput, match="not an integer"):
        codecs.get("webp:high")
    with pytest.raises(InvalidInput, match="lossless"):
        codecs.get("png:5")
    with pytest.raises(InvalidInput, match=r"RGB images \(N, 3, H, W\)"):
        codecs.get("png").encode(np.zeros((1, 1, 8, 8), dtype=np.float32))


@pytest.mark.parametrize("name", ["png", "jpeg", "webp"])
def test_corrupt_images_raise_naming_the_codec(name):
    c = codecs.get(name)
    payload = c.encode(_images(1))
    garbled = bytearray(payload)
    body = 5  # header (2) + height, width, count varints (1 each)
    garbled[body + 2:body + 40] = b"\x00" * 38  # length kept, image bytes destroyed
    for bad in (payload[:-3], bytes(garbled), payload + b"x"):
        with pytest.raises(InvalidInput, match=f"codec '{name}'"):
            c.decode(bad)


def test_an_image_of_another_size_than_the_header_says_is_refused():
    c = codecs.get("png")
    payload = c.encode(_images(1, 32))
    lying = wire.header("png") + wire.varint(16) + payload[3:]  # height 32 -> 16
    with pytest.raises(InvalidInput, match="the header says 32x16"):
        c.decode(lying)
