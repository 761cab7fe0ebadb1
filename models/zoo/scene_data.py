"""The scene data set: real handwritten digits composited onto crops of real photographs.

No image data set ships in a pip package, so ``scene-cnn`` trains on scenes built from
what does: the photographs bundled with scikit-learn and scikit-image, and the 8x8
digits bundled with scikit-learn. One scene is a random square crop of a photograph,
resized to ``size`` x ``size``, with one digit upscaled, rotated, coloured and blended
onto it; its label is the digit. Train and held-out scenes use *different photographs*
and *different digit samples* (the held-out digits of :func:`~edgeswarm.models.zoo.digits.
split_digits`), so held-out accuracy measures generalisation to unseen backgrounds and
unseen handwriting.

:func:`load_photos` reads files; everything else is a pure function of its arguments
and a ``numpy.random.Generator`` (or a seed), so one recipe always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgeswarm.placement.errors import InvalidInput, ModelFileError

#: Real photographs used as backgrounds. "sklearn:" names come from
#: ``sklearn.datasets.load_sample_image``; "skimage:" names are files that ship inside
#: the scikit-image wheel (read from disk, so nothing is ever downloaded).
TRAIN_PHOTOS = (
    "sklearn:flower.jpg", "skimage:astronaut.png", "skimage:coffee.png",
    "skimage:rocket.jpg", "skimage:motorcycle_left.png", "skimage:hubble_deep_field.jpg",
    "skimage:ihc.png", "skimage:camera.png", "skimage:brick.png", "skimage:gravel.png",
    "skimage:coins.png", "skimage:cell.png", "skimage:clock_motion.png", "skimage:page.png",
    "skimage:color.png", "skimage:chessboard_RGB.png",
)
HELDOUT_PHOTOS = (
    "sklearn:china.jpg", "skimage:chelsea.png", "skimage:retina.jpg",
    "skimage:grass.png", "skimage:moon.png",
)

#: Rec. 601 luma weights, used to keep a digit's colour distinguishable from its background.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_COLOUR_TRIES = 32


@dataclass(frozen=True)
class SceneRecipe:
    """Everything that decides the bytes of the data set (hashed into the cache key)."""

    size: int = 64
    n_train: int = 12000
    n_heldout: int = 1000
    seed: int = 0
    train_photos: tuple[str, ...] = TRAIN_PHOTOS
    heldout_photos: tuple[str, ...] = HELDOUT_PHOTOS
    #: side of the square crop taken from the photograph, in source pixels
    crop_min: int = 96
    crop_max: int = 384
    #: side of the digit as a fraction of the scene side
    digit_min: float = 0.45
    digit_max: float = 0.85
    max_rotation_deg: float = 10.0
    opacity_min: float = 0.85
    #: least luma difference between the digit colour and the background under it
    min_luma_contrast: float = 0.3
    #: upper bound of the Gaussian sensor-noise standard deviation (pixel values in [0, 1])
    noise_max: float = 0.03

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class SceneSplit:
    """Scenes ``(n, 3, size, size)`` uint8 and their labels ``(n,)`` int64."""

    images: np.ndarray
    labels: np.ndarray


# --- reading the sources --------------------------------------------------------------


def load_photos(names: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the named bundled photographs as ``(H, W, 3)`` uint8 RGB arrays."""
    return {name: _load_photo(name) for name in names}


def _load_photo(name: str) -> np.ndarray:
    source, _, filename = name.partition(":")
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return np.ascontiguousarray(load_sample_image(filename), dtype=np.uint8)
    if source == "skimage":
        import skimage.data

        path = Path(skimage.data.__file__).parent / filename
        if not path.is_file():
            raise ModelFileError(
                f"photograph {filename!r} is not bundled with this scikit-image install "
                f"(looked in {path.parent}); reinstall scikit-image or drop it from the "
                "scene recipe")
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    raise ModelFileError(
        f"photograph {name!r} names no known source; use 'sklearn:<file>' or "
        "'skimage:<file>'")


# --- building scenes (pure) -----------------------------------------------------------


def build_split(rng: np.random.Generator, photos: Sequence[np.ndarray], digits: np.ndarray,
                digit_labels: np.ndarray, n: int, recipe: SceneRecipe) -> SceneSplit:
    """Build ``n`` scenes with balanced labels from these photographs and digit samples.

    ``digits`` are ``(m, 8, 8)`` float intensities in [0, 1] with labels ``digit_labels``;
    each scene draws a photograph, a crop, a digit sample of its label and a look.
    """
    labels = rng.permutation(np.arange(n) % 10).astype(np.int64)
    by_label = [np.flatnonzero(digit_labels == label) for label in range(10)]
    images = np.empty((n, 3, recipe.size, recipe.size), dtype=np.uint8)
    for i, label in enumerate(labels):
        photo = photos[int(rng.integers(len(photos)))]
        digit = digits[rng.choice(by_label[label])]
        images[i] = make_scene(rng, photo, digit, recipe).transpose(2, 0, 1)
    return SceneSplit(images=images, labels=labels)


def make_scene(rng: np.random.Generator, photo: np.ndarray, digit: np.ndarray,
               recipe: SceneRecipe) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 scene: a crop of ``photo`` with ``digit`` blended on."""
    background = random_crop(rng, photo, recipe)
    alpha = digit_mask(rng, digit, recipe)
    top = int(rng.integers(recipe.size - alpha.shape[0] + 1))
    left = int(rng.integers(recipe.size - alpha.shape[1] + 1))
    window = background[top:top + alpha.shape[0], left:left + alpha.shape[1]]
    colour = digit_colour(rng, window, alpha, recipe.min_luma_contrast)
    alpha = alpha * rng.uniform(recipe.opacity_min, 1.0)
    blended = window * (1.0 - alpha[..., None]) + colour * alpha[..., None]
    background[top:top + alpha.shape[0], left:left + alpha.shape[1]] = blended
    noise = rng.normal(0.0, rng.uniform(0.0, recipe.noise_max), background.shape)
    return np.clip(np.rint((background + noise) * 255.0), 0, 255).astype(np.uint8)


def random_crop(rng: np.random.Generator, photo: np.ndarray, recipe: SceneRecipe) -> np.ndarray:
    """A random square crop, resized to the scene size, maybe mirrored; float32 in [0, 1]."""
    height, width = photo.shape[:2]
    largest = min(recipe.crop_max, height, width)
    side = int(rng.integers(min(recipe.crop_min, largest), largest + 1))
    top = int(rng.integers(height - side + 1))
    left = int(rng.integers(width - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    resized = np.asarray(crop.resize((recipe.size, recipe.size), Image.Resampling.BILINEAR))
    if rng.random() < 0.5:
        resized = resized[:, ::-1]
    return resized.astype(np.float32) / 255.0


def digit_mask(rng: np.random.Generator, digit: np.ndarray, recipe: SceneRecipe) -> np.ndarray:
    """The 8x8 digit upscaled to a random side and slightly rotated; float32 in [0, 1]."""
    fraction = rng.uniform(recipe.digit_min, recipe.digit_max)
    side = max(8, round(fraction * recipe.size))
    angle = rng.uniform(-recipe.max_rotation_deg, recipe.max_rotation_deg)
    mask = Image.fromarray(digit.astype(np.float32))
    mask = mask.resize((side, side), Image.Resampling.BILINEAR)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR)
    return np.clip(np.asarray(mask, dtype=np.float32), 0.0, 1.0)


def digit_colour(rng: np.random.Generator, window: np.ndarray, alpha: np.ndarray,
                 min_contrast: float) -> np.ndarray:
    """A random RGB colour whose luma differs from the background under the digit.

    Draws until the contrast is at least ``min_contrast``; after a few failures falls
    back to black or white, whichever is further from the background.
    """
    weights = alpha[..., None] + 1e-6
    under = (window * weights).sum(axis=(0, 1)) / weights.sum(axis=(0, 1))
    luma = float(under @ _LUMA)
    for _ in range(_COLOUR_TRIES):
        colour = rng.random(3).astype(np.float32)
        if abs(float(colour @ _LUMA) - luma) >= min_contrast:
            return colour
    return np.full(3, 0.0 if luma > 0.5 else 1.0, dtype=np.float32)


def build_dataset(recipe: SceneRecipe, photos: Mapping[str, np.ndarray],
                  train_digits: tuple[np.ndarray, np.ndarray],
                  heldout_digits: tuple[np.ndarray, np.ndarray]) -> dict[str, SceneSplit]:
    """Both splits: train scenes from train photos and train digits, held-out from the rest.

    The two splits draw from independent streams of ``recipe.seed``, so changing the
    size of one does not change the other.
    """
    overlap = set(recipe.train_photos) & set(recipe.heldout_photos)
    if overlap:
        raise InvalidInput(
            f"photographs {sorted(overlap)} are in both splits; give each split its own")
    train_rng, heldout_rng = (np.random.default_rng([recipe.seed, s]) for s in (0, 1))
    return {
        "train": build_split(train_rng, [photos[n] for n in recipe.train_photos],
                             *train_digits, recipe.n_train, recipe),
        "heldout": build_split(heldout_rng, [photos[n] for n in recipe.heldout_photos],
                               *heldout_digits, recipe.n_heldout, recipe),
    }
