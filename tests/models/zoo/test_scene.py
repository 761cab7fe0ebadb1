"""scene-cnn and its data set: accuracy, shapes, honest splits, determinism and caching.

The session fixture loads the model from the default cache (the first run ever builds
the scenes and trains, about a minute); data-builder tests use small recipes and, where
they test caching, a temporary ``EDGESWARM_CACHE``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx
from sklearn.linear_model import LogisticRegression

from edgeswarm.models import zoo
from edgeswarm.models.zoo import ZooModel, digits, scene, scene_data
from edgeswarm.models.zoo.scene_data import SceneRecipe
from edgeswarm.placement.errors import InvalidInput, ModelFileError

TARGET = 0.90
SIZE = scene.RECIPE.size
SMALL = dataclasses.replace(scene.RECIPE, n_train=30, n_heldout=20)


@pytest.fixture(scope="session")
def model() -> ZooModel:
    return zoo.load("scene-cnn")


@pytest.fixture(scope="session")
def sources() -> dict[str, object]:
    split = digits.split_digits()
    return {
        "photos": scene_data.load_photos(SMALL.train_photos + SMALL.heldout_photos),
        "train_digits": (split.train_images, split.train_labels),
        "heldout_digits": (split.heldout_images, split.heldout_labels),
    }


def _build(recipe: SceneRecipe, sources: dict[str, object]) -> dict[str, scene_data.SceneSplit]:
    return scene_data.build_dataset(recipe, sources["photos"], sources["train_digits"],
                                    sources["heldout_digits"])


def _refuse(*_: object, **__: object) -> None:
    raise AssertionError("a cached load rebuilt or retrained")


# --- the model ------------------------------------------------------------------------


@pytest.mark.slow
def test_heldout_accuracy_meets_target(model: ZooModel) -> None:
    with torch.no_grad():
        logits = torch.cat([model.module(*model.heldout.batch(start, 250))
                            for start in range(0, len(model.heldout), 250)])
    measured = float((logits.argmax(dim=1) == model.heldout.labels).float().mean())
    assert measured >= TARGET
    assert model.reported["heldout_accuracy"] == pytest.approx(measured, abs=0.003)
    assert model.metric == "accuracy"


@pytest.mark.slow
def test_shapes_names_and_ranges(model: ZooModel) -> None:
    assert model.name == "scene-cnn"
    assert model.input_names == ("input",) and model.output_names == ("logits",)
    (example,) = model.example_inputs
    assert example.shape == (1, 3, SIZE, SIZE) and example.dtype == torch.float32
    with torch.no_grad():
        assert model.module(example).shape == (1, 10)
    (heldout,) = model.heldout.inputs
    assert heldout.shape == (scene.RECIPE.n_heldout, 3, SIZE, SIZE)
    assert model.heldout.labels is not None
    assert np.array_equal(np.bincount(model.heldout.labels.numpy(), minlength=10),
                          np.full(10, scene.RECIPE.n_heldout // 10))
    (calibration,) = model.calibration
    assert calibration.shape == (digits.CALIBRATION_ROWS, 3, SIZE, SIZE)
    for tensor in (heldout, calibration):
        assert tensor.dtype == torch.float32
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert not model.module.training


@pytest.mark.slow
def test_activations_mid_network_are_larger_than_the_input(model: ZooModel) -> None:
    x = model.example_inputs[0]
    stem = model.module[:3](x)
    assert stem.numel() > x.numel()


@pytest.mark.slow
def test_second_load_reads_the_cache(model: ZooModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digits, "fit", _refuse)
    monkeypatch.setattr(scene_data, "build_dataset", _refuse)
    again = scene.load()
    batch = model.heldout.batch(0, 64)
    with torch.no_grad():
        assert torch.equal(model.module(*batch), again.module(*again.heldout.batch(0, 64)))
    assert torch.equal(model.heldout.inputs[0], again.heldout.inputs[0])
    assert again.reported == model.reported


@pytest.mark.slow
def test_calibration_is_the_start_of_the_cached_training_split(model: ZooModel) -> None:
    train = scene.read_split(scene.dataset_path(scene.RECIPE), "train",
                             rows=digits.CALIBRATION_ROWS)
    assert torch.equal(model.calibration[0], scene.to_input(torch.from_numpy(train.images)))


@pytest.mark.slow
def test_no_heldout_scene_is_a_training_scene(model: ZooModel) -> None:
    train = scene.read_split(scene.dataset_path(scene.RECIPE), "train")
    train_rows = {image.tobytes() for image in train.images}
    heldout = (model.heldout.inputs[0] * 255).round().to(torch.uint8).numpy()
    assert not {image.tobytes() for image in heldout} & train_rows


@pytest.mark.slow
def test_colour_statistics_alone_do_not_give_the_label(model: ZooModel) -> None:
    """A linear model on per-channel mean and spread stays near chance: no label leak."""
    train = scene.read_split(scene.dataset_path(scene.RECIPE), "train", rows=3000)

    def features(images: np.ndarray) -> np.ndarray:
        flat = images.reshape(len(images), 3, -1).astype(np.float32) / 255
        return np.concatenate([flat.mean(axis=2), flat.std(axis=2)], axis=1)

    probe = LogisticRegression(max_iter=1000).fit(features(train.images), train.labels)
    heldout = (model.heldout.inputs[0] * 255).round().to(torch.uint8).numpy()
    assert probe.score(features(heldout), model.heldout.labels.numpy()) < 0.2


@pytest.mark.slow
def test_module_is_fx_traceable_layer_by_layer(model: ZooModel) -> None:
    traced = torch.fx.symbolic_trace(model.module)
    assert {node.op for node in traced.graph.nodes} == {"placeholder", "call_module", "output"}
    batch = model.heldout.batch(0, 8)
    with torch.no_grad():
        assert torch.equal(traced(*batch), model.module(*batch))


# --- the data builder -----------------------------------------------------------------


def test_builder_is_deterministic_for_a_seed(sources: dict[str, object]) -> None:
    first, second = _build(SMALL, sources), _build(SMALL, sources)
    other = _build(dataclasses.replace(SMALL, seed=SMALL.seed + 1), sources)
    for split in ("train", "heldout"):
        assert np.array_equal(first[split].images, second[split].images)
        assert np.array_equal(first[split].labels, second[split].labels)
        assert not np.array_equal(first[split].images, other[split].images)
    assert first["train"].images.shape == (SMALL.n_train, 3, SIZE, SIZE)
    assert first["train"].images.dtype == np.uint8
    assert first["heldout"].labels.dtype == np.int64


def test_splits_do_not_share_photographs_or_digit_samples() -> None:
    assert not set(scene.RECIPE.train_photos) & set(scene.RECIPE.heldout_photos)
    split = digits.split_digits()
    assert not set(split.train_index.tolist()) & set(split.heldout_index.tolist())


def test_a_photograph_in_both_splits_is_refused(sources: dict[str, object]) -> None:
    leaky = dataclasses.replace(SMALL, heldout_photos=(*SMALL.heldout_photos,
                                                       SMALL.train_photos[0]))
    with pytest.raises(InvalidInput, match="both splits"):
        _build(leaky, sources)


def test_scene_uses_only_the_digit_samples_it_is_given() -> None:
    """A split whose digit pool is one sample per class shows exactly those samples."""
    rng = np.random.default_rng(0)
    photo = np.full((200, 200, 3), 128, dtype=np.uint8)
    pool = np.zeros((10, 8, 8), dtype=np.float32)
    for label in range(10):
        pool[label, label % 8, :] = 1.0  # class k is a bar on row k % 8
    recipe = dataclasses.replace(SMALL, max_rotation_deg=0.0, noise_max=0.0,
                                 digit_min=1.0, digit_max=1.0, opacity_min=1.0)
    built = scene_data.build_split(rng, [photo], pool, np.arange(10), 20, recipe)
    for image, label in zip(built.images, built.labels, strict=True):
        differs = np.abs(image.astype(int) - 128).sum(axis=0) > 30
        rows = np.flatnonzero(differs.any(axis=1))
        centre = (rows.min() + rows.max()) / 2 / SIZE * 8
        assert abs(centre - (label % 8 + 0.5)) < 0.75


def test_dataset_cache_is_written_once_and_read_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sources: dict[str, object]) -> None:
    monkeypatch.setenv("EDGESWARM_CACHE", str(tmp_path))
    path = scene.dataset_path(SMALL)
    assert path.parent == tmp_path and SMALL.key() in path.name
    expected = _build(SMALL, sources)
    assert scene.ensure_dataset(SMALL, path)
    monkeypatch.setattr(scene_data, "build_dataset", _refuse)
    assert not scene.ensure_dataset(SMALL, path)
    for split in ("train", "heldout"):
        stored = scene.read_split(path, split)
        assert np.array_equal(stored.images, expected[split].images)
        assert np.array_equal(stored.labels, expected[split].labels)
    assert np.array_equal(scene.read_split(path, "train", rows=5).images,
                          expected["train"].images[:5])
    assert not list(tmp_path.glob("*.partial"))


def test_recipe_key_changes_with_the_recipe() -> None:
    assert SMALL.key() == dataclasses.replace(SMALL).key()
    assert SMALL.key() != dataclasses.replace(SMALL, digit_min=0.5).key()
    assert SMALL.key() != dataclasses.replace(SMALL, seed=1).key()


def test_bad_cache_and_source_names_are_reported(tmp_path: Path) -> None:
    garbage = tmp_path / "scene-data.safetensors"
    garbage.write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match="delete the file"):
        scene.read_split(garbage, "train")
    with pytest.raises(InvalidInput, match="unknown split"):
        scene.read_split(garbage, "validation")
    with pytest.raises(ModelFileError, match="no known source"):
        scene_data.load_photos(["flickr:cat.jpg"])
    with pytest.raises(ModelFileError, match="not bundled"):
        scene_data.load_photos(["skimage:no_such_photo.png"])
