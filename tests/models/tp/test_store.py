"""The weight store: files written by write_shard read back exactly, and bad files fail
with a ModelFileError that names them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from edgeswarm.models.tp.store import (
    ALIGN,
    EXTRA_FILE,
    META_FILE,
    ResidentStore,
    layer_file,
    open_store,
    write_shard,
)
from edgeswarm.placement.errors import InvalidInput, ModelFileError


def _layers(n: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{
        "qkv": torch.randn(24, 16, generator=g),
        "norm": torch.randn(16, generator=g),
        "half": torch.randn(5, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "ids": torch.arange(i, i + 5, dtype=torch.int64),
        "mask": torch.tensor([True, False, i % 2 == 0]),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(6, 4, generator=g).t(),  # not contiguous: stored contiguous
    } for i in range(n)]


def _extra() -> dict[str, torch.Tensor]:
    return {"embed": torch.randn(50, 16, generator=torch.Generator().manual_seed(9)),
            "norm": torch.ones(16)}


def _written(tmp_path: Path, n: int = 3) -> tuple[Path, list[dict[str, torch.Tensor]]]:
    layers = _layers(n)
    write_shard(tmp_path / "shard", layers, _extra(), {"kind": "test", "rank": 0})
    return tmp_path / "shard", layers


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_round_trip(tmp_path: Path) -> None:
    layers = _layers()
    extra = _extra()
    written = write_shard(tmp_path, layers, extra, {"kind": "test", "nested": {"a": [1, 2]}})
    expected = (sum(t.nbytes for layer in layers for t in layer.values())
                + sum(t.nbytes for t in extra.values()))
    assert written == expected
    store = open_store(tmp_path)
    assert isinstance(store, ResidentStore)
    assert store.num_layers == 3
    assert store.meta == {"kind": "test", "nested": {"a": [1, 2]}}
    assert store.param_bytes() == store.resident_bytes() == expected
    for i, layer in enumerate(layers):
        _same(store.layer(i), layer)
    _same(store.extra(), extra)
    store.close()
    assert store.resident_bytes() == 0
    with pytest.raises(InvalidInput, match="closed"):
        store.layer(0)


def test_files_are_plain_aligned_safetensors(tmp_path: Path) -> None:
    directory, layers = _written(tmp_path)
    path = directory / layer_file(1)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(layers[1])
        for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            assert torch.equal(f.get_tensor(name), layers[1][name]), name
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header) % ALIGN == 0


def test_rewriting_a_shard_replaces_it(tmp_path: Path) -> None:
    directory, _ = _written(tmp_path, n=3)
    fewer = _layers(2, seed=5)
    write_shard(directory, fewer, _extra(), {"kind": "again"})
    store = open_store(directory)
    assert store.num_layers == 2 and store.meta == {"kind": "again"}
    _same(store.layer(1), fewer[1])


@pytest.mark.parametrize("window", [None, 2])
def test_missing_meta_is_named(tmp_path: Path, window: int | None) -> None:
    directory, _ = _written(tmp_path)
    (directory / META_FILE).unlink()
    with pytest.raises(ModelFileError, match=META_FILE):
        open_store(directory, window)


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("name", [layer_file(1), EXTRA_FILE])
def test_missing_file_is_named(tmp_path: Path, window: int | None, name: str) -> None:
    directory, _ = _written(tmp_path)
    (directory / name).unlink()
    with pytest.raises(ModelFileError, match=name) as info:
        open_store(directory, window)
    assert "missing" in str(info.value)


@pytest.mark.parametrize("window", [None, 2])
def test_truncated_file_is_named(tmp_path: Path, window: int | None) -> None:
    directory, _ = _written(tmp_path)
    path = directory / layer_file(2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ModelFileError, match=layer_file(2)):
        open_store(directory, window)


@pytest.mark.parametrize("window", [None, 1])
def test_corrupt_bytes_are_caught_by_the_checksum(tmp_path: Path, window: int | None) -> None:
    directory, _ = _written(tmp_path)
    path = directory / layer_file(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one weight changed
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=f"{layer_file(0)} is corrupt"):
        open_store(directory, window)
    open_store(directory, window, verify=False).close()  # the header itself is fine


@pytest.mark.parametrize("window", [None, 1])
def test_corrupt_header_without_checksum(tmp_path: Path, window: int | None) -> None:
    directory, _ = _written(tmp_path)
    path = directory / layer_file(1)
    data = bytearray(path.read_bytes())
    data[8:12] = b"{{{{"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=rf"{layer_file(1)}.*header"):
        open_store(directory, window, verify=False)


def test_header_pointing_outside_the_file(tmp_path: Path) -> None:
    directory, _ = _written(tmp_path)
    path = directory / layer_file(0)
    data = bytearray(path.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=layer_file(0)):
        open_store(directory, verify=False)


def test_malformed_meta(tmp_path: Path) -> None:
    directory, _ = _written(tmp_path)
    meta = json.loads((directory / META_FILE).read_text())
    meta["format"] = "something-else"
    (directory / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ModelFileError, match="something-else"):
        open_store(directory)
    (directory / META_FILE).write_text("not json")
    with pytest.raises(ModelFileError, match=META_FILE):
        open_store(directory)


@pytest.mark.parametrize("window", [0, -1, True, 1.5, "2"])
def test_bad_window(tmp_path: Path, window: object) -> None:
    directory, _ = _written(tmp_path)
    with pytest.raises(InvalidInput, match="window"):
        open_store(directory, window)  # type: ignore[arg-type]


def test_bad_layer_index(tmp_path: Path) -> None:
    directory, _ = _written(tmp_path)
    store = open_store(directory)
    for bad in (-1, 3, True, 1.0):
        with pytest.raises(InvalidInput, match="layer index"):
            store.layer(bad)  # type: ignore[arg-type]


def test_bad_input_to_write_shard(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"dense torch\.Tensor"):
        write_shard(tmp_path, [{"w": [1.0, 2.0]}], {}, {})  # type: ignore[dict-item]
    with pytest.raises(InvalidInput, match="JSON"):
        write_shard(tmp_path, [], {}, {"bad": object()})
    with pytest.raises(InvalidInput, match="sequence"):
        write_shard(tmp_path, {"w": torch.ones(1)}, {}, {})  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="dtype"):
        write_shard(tmp_path, [{"c": torch.ones(2, dtype=torch.complex64)}], {}, {})
    with pytest.raises(InvalidInput, match="names"):
        write_shard(tmp_path, [{"": torch.ones(2)}], {}, {})
