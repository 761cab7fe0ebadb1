"""Input codecs: compress the camera image itself with PNG, JPEG or WebP (Pillow).

The baseline that feature compression must beat: instead of cutting the model, send the
input image compressed by a standard image codec and run the whole model on the receiver.
Inputs are ``(N, 3, H, W)`` float32 RGB in [0, 1] (the zoo's image models take these);
they are rounded to 8 bits, so PNG is exact for inputs that came from 8-bit images.
``setting`` is the quality (JPEG 1-95, WebP 0-100; PNG has none and is lossless).

Payload: the height and width, the number of images, then per image its length and
its encoded bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from edgeswarm.models.codecs import wire
from edgeswarm.models.codecs.base import Codec, CodecProfile, as_batch
from edgeswarm.placement.errors import InvalidInput

#: Pillow's format name and the quality range of each image codec.
_FORMATS: dict[str, tuple[str, int, int]] = {
    "png": ("PNG", 0, 0), "jpeg": ("JPEG", 1, 95), "webp": ("WEBP", 0, 100),
}
#: The largest image side a payload may declare (a guard against decompression bombs).
MAX_SIDE = 4096
_PRIOR_S_PER_BYTE = 1.0 / 2e8


class ImageCodec(Codec):
    """One of PNG, JPEG or WebP at one quality."""

    def __init__(self, name: str, setting: str | None = None,
                 profile: CodecProfile | None = None) -> None:
        if name not in _FORMATS:
            raise InvalidInput(f"unknown image codec {name!r}; use one of {', '.join(_FORMATS)}")
        self.name = name
        self.format, low, high = _FORMATS[name]
        if name == "png":
            if setting is not None:
                raise InvalidInput("codec 'png' is lossless and takes no quality setting")
            self.quality: int | None = None
        else:
            try:
                quality = int(setting if setting is not None else high)
            except ValueError:
                raise InvalidInput(f"codec {name!r}: quality {setting!r} is not an integer") \
                    from None
            if not low <= quality <= high:
                raise InvalidInput(f"codec {name!r}: quality {quality} is outside {low}-{high}")
            self.quality = quality
            setting = str(quality)
        super().__init__(setting, profile)

    def prior(self) -> CodecProfile:
        ratio = 0.2 if self.quality is None else 0.05
        return CodecProfile(ratio, _PRIOR_S_PER_BYTE, _PRIOR_S_PER_BYTE)

    def encode(self, x: np.ndarray) -> bytes:
        arr = as_batch(self.name, x, min_dims=3)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise InvalidInput(f"codec {self.name!r}: expected RGB images (N, 3, H, W), got "
                               f"shape {arr.shape}")
        pixels = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        out = [wire.header(self.name), wire.varint(arr.shape[2]), wire.varint(arr.shape[3]),
               wire.varint(len(arr))]
        options = {} if self.quality is None else {"quality": self.quality}
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image)).save(buffer, format=self.format,
                                                              **options)
            out += [wire.varint(buffer.tell()), buffer.getvalue()]
        return b"".join(out)

    def decode(self, data: bytes) -> np.ndarray:
        r = wire.Reader(self.name, data)
        height, width = r.varint("height", MAX_SIDE), r.varint("width", MAX_SIDE)
        n = r.varint("image count")
        images = np.empty((n, height, width, 3), dtype=np.uint8)
        for i in range(n):
            blob = r.take(r.varint(f"length of image {i}"), f"image {i}")
            try:
                with Image.open(io.BytesIO(blob), formats=[self.format]) as image:
                    size = image.size
                    pixels = np.asarray(image.convert("RGB")) if size == (width, height) \
                        else None
            except (OSError, ValueError, SyntaxError) as exc:  # what Pillow raises on bad data
                r.fail(f"image {i} is not a valid {self.format} ({exc})")
            if pixels is None:
                r.fail(f"image {i} is {size[0]}x{size[1]}, the header says {width}x{height}")
            images[i] = pixels
        r.done()
        return images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
