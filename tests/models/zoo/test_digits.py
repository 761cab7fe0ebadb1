"""digits-mlp and digits-cnn: accuracy, shapes, the split, caching and determinism.

The session fixture loads both models from the default cache (training them once if
needed); only the caching tests point ``EDGESWARM_CACHE`` at a temporary folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

from edgeswarm.models import zoo
from edgeswarm.models.zoo import ZooModel, digits
from edgeswarm.placement.errors import ModelFileError

TARGETS = {"digits-mlp": 0.96, "digits-cnn": 0.97}
INPUT_SHAPES = {"digits-mlp": (64,), "digits-cnn": (1, 8, 8)}


@pytest.fixture(scope="session")
def models() -> dict[str, ZooModel]:
    return {name: zoo.load(name) for name in TARGETS}


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGESWARM_CACHE", str(tmp_path))
    return tmp_path


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", list(TARGETS))
def test_heldout_accuracy_meets_target(models: dict[str, ZooModel], name: str) -> None:
    model = models[name]
    with torch.no_grad():
        logits = model.module(*model.heldout.inputs)
    measured = float((logits.argmax(dim=1) == model.heldout.labels).float().mean())
    assert measured >= TARGETS[name]
    assert model.reported["heldout_accuracy"] == pytest.approx(measured, abs=0.003)
    assert model.metric == "accuracy"


@pytest.mark.parametrize("name", list(TARGETS))
def test_shapes_names_and_ranges(models: dict[str, ZooModel], name: str) -> None:
    model = models[name]
    shape = INPUT_SHAPES[name]
    assert model.name == name
    assert model.input_names == ("input",)
    assert model.output_names == ("logits",)
    (example,) = model.example_inputs
    assert example.shape == (1, *shape) and example.dtype == torch.float32
    with torch.no_grad():
        assert model.module(example).shape == (1, 10)
    (heldout,) = model.heldout.inputs
    assert heldout.shape == (450, *shape)
    assert model.heldout.labels is not None and model.heldout.labels.shape == (450,)
    (calibration,) = model.calibration
    assert calibration.shape == (digits.CALIBRATION_ROWS, *shape)
    for tensor in (heldout, calibration):
        assert tensor.dtype == torch.float32
        assert float(tensor.min()) >= 0.0 and float(tensor.max()) <= 1.0
    assert not model.module.training


def test_split_is_disjoint_complete_and_stratified() -> None:
    split = digits.split_digits()
    train, heldout = set(split.train_index.tolist()), set(split.heldout_index.tolist())
    assert not train & heldout
    assert len(train | heldout) == 1797
    counts = np.bincount(split.heldout_labels, minlength=10)
    totals = counts + np.bincount(split.train_labels, minlength=10)
    assert np.all(np.abs(counts - totals * digits.HELDOUT_FRACTION) <= 1)
    again = digits.split_digits()
    assert np.array_equal(split.heldout_index, again.heldout_index)


@pytest.mark.parametrize("name", list(TARGETS))
def test_calibration_comes_from_the_training_split(models: dict[str, ZooModel],
                                                   name: str) -> None:
    split = digits.split_digits()
    train_rows = {row.tobytes() for row in split.train_images.reshape(-1, 64)}
    heldout_rows = {row.tobytes() for row in split.heldout_images.reshape(-1, 64)}
    calibration = models[name].calibration[0].reshape(-1, 64).numpy()
    rows = {row.tobytes() for row in calibration}
    assert rows <= train_rows
    assert not rows & heldout_rows


def test_second_load_reads_the_cache(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = digits.load_mlp()
    files = list(tmp_cache.glob("digits-mlp-*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the second load trained instead of reading the cache")

    monkeypatch.setattr(digits, "fit", refuse)
    second = digits.load_mlp()
    _assert_same_state(first.module, second.module)
    with torch.no_grad():
        assert torch.equal(first.module(*first.heldout.inputs),
                           second.module(*second.heldout.inputs))
    assert files[0].stat().st_mtime_ns == stamp
    assert not list(tmp_cache.glob("*.partial"))


def test_training_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   models: dict[str, ZooModel]) -> None:
    loaded = []
    for run in ("a", "b"):
        monkeypatch.setenv("EDGESWARM_CACHE", str(tmp_path / run))
        loaded.append(digits.load_mlp())
    _assert_same_state(loaded[0].module, loaded[1].module)
    # and the same as whatever the shared cache holds (trained by another process)
    _assert_same_state(loaded[0].module, models["digits-mlp"].module)


def test_changed_recipe_changes_the_cache_key() -> None:
    data = {"shape": [64]}
    key = digits.weights_key(digits.build_mlp(), digits.MLP_TRAIN, data)
    assert key == digits.weights_key(digits.build_mlp(), digits.MLP_TRAIN, data)
    longer = dataclasses.replace(digits.MLP_TRAIN, epochs=digits.MLP_TRAIN.epochs + 1)
    assert key != digits.weights_key(digits.build_mlp(), longer, data)
    assert key != digits.weights_key(digits.build_cnn(), digits.MLP_TRAIN, data)
    assert key != digits.weights_key(digits.build_mlp(), digits.MLP_TRAIN, {"shape": [8]})


def test_corrupt_cache_file_is_reported(tmp_cache: Path) -> None:
    module = digits.build_mlp()
    key = digits.weights_key(module, digits.MLP_TRAIN, digits.data_recipe((64,)))
    path = digits.weights_path("digits-mlp", key)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="delete the file"):
        digits.load_mlp()


def test_deterministic_context_restores_the_callers_settings() -> None:
    threads = torch.get_num_threads()
    strict = torch.are_deterministic_algorithms_enabled()
    before = torch.random.get_rng_state()
    with digits.deterministic(seed=3, threads=1):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        torch.rand(10)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == strict
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("name", list(TARGETS))
def test_module_is_fx_traceable_layer_by_layer(models: dict[str, ZooModel], name: str) -> None:
    model = models[name]
    traced = torch.fx.symbolic_trace(model.module)
    ops = {node.op for node in traced.graph.nodes}
    assert ops == {"placeholder", "call_module", "output"}
    batch = model.heldout.batch(0, 16)
    with torch.no_grad():
        assert torch.equal(traced(*batch), model.module(*batch))
