"""The sliding-window store: the right tensors, never more than k layers resident, the
prefetch wraps to the next pass, and evicted layers really leave the process's RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edgeswarm.models.tp.memory import current_rss_bytes, hwm_bytes, peak_rss_bytes
from edgeswarm.models.tp.store import layer_file, open_store, write_shard
from edgeswarm.models.tp.window import MODES, WindowStore
from edgeswarm.placement.errors import InvalidInput, ModelFileError

LAYERS = 6
MB = 1 << 20


def _layers(n: int = LAYERS, rows: int = 64) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"w": torch.randn(rows, 32, generator=g), "b": torch.full((32,), float(i)),
             "ids": torch.arange(i, i + 3)} for i in range(n)]


@pytest.fixture
def shard(tmp_path: Path) -> tuple[Path, list[dict[str, torch.Tensor]], int]:
    layers = _layers()
    write_shard(tmp_path, layers, {"embed": torch.randn(10, 32)}, {"kind": "test"})
    return tmp_path, layers, sum(t.nbytes for t in layers[0].values())


def _wait_for(predicate, timeout_s: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (a bound, not a timing assertion: it fails only if it never holds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return bool(predicate())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window", [1, 2, 4])
def test_every_pass_sees_the_written_weights_within_the_bound(shard, mode, window) -> None:  # type: ignore[no-untyped-def]
    directory, layers, layer_bytes = shard
    extra_bytes = 10 * 32 * 4
    with WindowStore(directory, window, mode=mode) as store:
        assert store.num_layers == LAYERS and store.meta == {"kind": "test"}
        assert store.param_bytes() == extra_bytes + LAYERS * layer_bytes
        for _ in range(3):
            for i, expected in enumerate(layers):
                got = store.layer(i)
                for name, tensor in expected.items():
                    assert torch.equal(got[name], tensor), (i, name)
                resident = store.resident_layers()
                assert i in resident
                window_set = {(i + d) % LAYERS for d in range(window)}
                assert set(resident) <= window_set
                assert store.resident_bytes() <= extra_bytes + window * layer_bytes
        assert store.loads >= 3 * LAYERS  # a window smaller than the model reloads


@pytest.mark.parametrize("mode", MODES)
def test_prefetch_wraps_to_the_next_pass(shard, mode) -> None:  # type: ignore[no-untyped-def]
    directory, _, _ = shard
    with WindowStore(directory, 3, mode=mode) as store:
        for i in range(LAYERS):
            store.layer(i)
        # After the last layer, the window is [L-1, 0, 1]: the next pass's first layers.
        assert _wait_for(lambda: store.resident_layers() == [0, 1, LAYERS - 1])
        loads = store.loads
        store.layer(0)
        assert _wait_for(lambda: store.resident_layers() == [0, 1, 2])
        assert store.loads == loads + 1  # only layer 2 came in: 0 and 1 were prefetched


@pytest.mark.parametrize("mode", MODES)
def test_a_window_as_large_as_the_model_loads_once(shard, mode) -> None:  # type: ignore[no-untyped-def]
    directory, layers, _ = shard
    with WindowStore(directory, 100, mode=mode) as store:
        for _ in range(3):
            for i in range(LAYERS):
                assert torch.equal(store.layer(i)["w"], layers[i]["w"])
        assert store.loads == LAYERS
        assert store.resident_layers() == list(range(LAYERS))


@pytest.mark.parametrize("mode", MODES)
def test_random_access_and_dropped_page_cache(shard, mode) -> None:  # type: ignore[no-untyped-def]
    directory, layers, _ = shard
    with WindowStore(directory, 2, mode=mode, keep_page_cache=False) as store:
        for i in [5, 0, 3, 3, 1, 4, 2, 5, 0]:
            assert torch.equal(store.layer(i)["w"], layers[i]["w"])
            assert len(store.resident_layers()) <= 2


def test_open_store_makes_a_window_store(shard) -> None:  # type: ignore[no-untyped-def]
    directory, layers, _ = shard
    store = open_store(directory, window=2)
    assert isinstance(store, WindowStore) and store.mode == "mmap"
    assert torch.equal(store.layer(3)["b"], layers[3]["b"])
    store.close()


def test_bad_arguments(shard) -> None:  # type: ignore[no-untyped-def]
    directory, _, _ = shard
    for window in (0, -3, False):
        with pytest.raises(InvalidInput, match="window"):
            WindowStore(directory, window)
    with pytest.raises(InvalidInput, match="mode"):
        WindowStore(directory, 2, mode="carrier-pigeon")  # type: ignore[arg-type]
    with WindowStore(directory, 2) as store, pytest.raises(InvalidInput, match="layer index"):
        store.layer(LAYERS)


def test_a_file_lost_after_open_is_named(shard) -> None:  # type: ignore[no-untyped-def]
    directory, _, _ = shard
    with WindowStore(directory, 2, mode="read") as store:
        store.layer(0)
        (directory / layer_file(4)).unlink()
        with pytest.raises(ModelFileError, match=layer_file(4)):
            for i in range(LAYERS):
                store.layer(i)


def test_close_stops_the_loader(shard) -> None:  # type: ignore[no-untyped-def]
    directory, _, _ = shard
    store = WindowStore(directory, 2, mode="read")
    store.layer(0)
    store.close()
    store.close()  # twice is fine
    assert not [t for t in threading.enumerate() if t.name == "edgeswarm-tp-window"]
    with pytest.raises(InvalidInput, match="closed"):
        store.layer(1)


# --- memory really goes back --------------------------------------------------------

BIG_LAYERS = 8
BIG_ROWS = 64 * 1024  # x 32 float32 = 8 MiB a layer


@pytest.fixture(scope="module")
def big_shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("big")
    write_shard(directory, _layers(BIG_LAYERS, rows=BIG_ROWS), {}, {})
    return directory


# A phase's peak RSS is measured in a fresh interpreter: a long-lived process (the whole
# test session) holds freed pages that stay resident, so new tensors can reuse them without
# the resident set growing, and a bound on growth would hold whatever the store did.
_MEASURE = """
import json, sys
from pathlib import Path
import torch
from edgeswarm.models.tp.memory import PeakMeter, hwm_bytes, reset_peak
from edgeswarm.models.tp.store import open_store
from edgeswarm.models.tp.window import WindowStore

what, directory, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def walk(store):
    for _ in range(2):
        for i in range(store.num_layers):
            float(store.layer(i)["w"].sum())  # touches every page of the layer

out = {}
if what == "window":
    with WindowStore(directory, 2, mode=mode) as store, PeakMeter() as meter:
        walk(store)
elif what == "resident":
    with PeakMeter() as meter:
        store = open_store(directory)
        walk(store)
else:  # a 48 MiB block, touched and freed
    with PeakMeter() as meter:
        block = torch.ones(48 * 2**20 // 4)
        del block
    out["reset"] = reset_peak()
    out["hwm_after_reset"] = hwm_bytes()
out.update(grown=meter.peak_bytes - meter.start_bytes, peak=meter.peak_bytes,
           method=meter.method)
print(json.dumps(out))
"""


def _measure(what: str, directory: Path | str = "", mode: str = "") -> dict:  # type: ignore[type-arg]
    done = subprocess.run([sys.executable, "-c", _MEASURE, what, str(directory), mode],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.parametrize("mode", MODES)
def test_rss_stays_within_the_window(big_shard: Path, mode) -> None:  # type: ignore[no-untyped-def]
    layer = BIG_ROWS * 32 * 4
    got = _measure("window", big_shard, mode)
    # Two layers resident (+ a third while a cancelled read finishes), and slack for the
    # interpreter; all eight (64 MiB) would not fit.
    assert got["grown"] < 3 * layer + 12 * MB, got


def test_the_rss_check_can_fail(big_shard: Path) -> None:
    """The same walk over a resident store exceeds the bound the window test asserts."""
    layer = BIG_ROWS * 32 * 4
    got = _measure("resident", big_shard)
    assert got["grown"] > 6 * layer, got


def test_eviction_gives_mapped_pages_back(big_shard: Path) -> None:
    def walk(store) -> None:  # type: ignore[no-untyped-def]
        for i in range(store.num_layers):
            float(store.layer(i)["w"].sum())

    with WindowStore(big_shard, BIG_LAYERS) as store:  # nothing evicted by the walk
        before = current_rss_bytes()
        walk(store)
        grown = current_rss_bytes() - before
        assert grown > 6 * BIG_ROWS * 32 * 4
        store.close()
        assert current_rss_bytes() < before + grown / 4


def test_peak_helpers() -> None:
    assert peak_rss_bytes() >= current_rss_bytes() > 0
    assert hwm_bytes() >= current_rss_bytes()
    got = _measure("block")
    assert got["grown"] > 40 * MB, got
    if got["reset"]:
        assert got["hwm_after_reset"] < got["peak"], got


# --- the member program over a window: the same numbers --------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_llama_member_over_a_window_computes_the_same_logits(tmp_path: Path, mode) -> None:  # type: ignore[no-untyped-def]
    """The window changes where the weights live, never the arithmetic: logits are equal
    bit for bit to the resident store's (far inside the issue's 1e-4)."""
    from edgeswarm.models.tp.collective import Solo
    from edgeswarm.models.tp.llama import LlamaMember, llama_shape, slice_llama
    from edgeswarm.models.tp.split import split_layers
    from edgeswarm.models.zoo.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=64, num_layers=5,
                         num_heads=6, num_kv_heads=2, context_length=64)
    model = LlamaForCausalLM(config).eval()
    (shard,) = slice_llama(model, split_layers(llama_shape(config), [1.0], granule=16))
    write_shard(tmp_path, shard.layers, shard.extra, shard.meta)
    prompt = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))

    def run(store) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
        member = LlamaMember(store, Solo())
        out = [member.prefill(prompt)]
        token = out[0][:, -1].argmax(dim=-1)
        for _ in range(4):
            out.append(member.decode(token))
            token = out[-1].argmax(dim=-1)
        store.close()
        return out

    resident = run(open_store(tmp_path))
    windowed = run(WindowStore(tmp_path, 2, mode=mode))
    for a, b in zip(resident, windowed, strict=True):
        assert torch.equal(a, b)
    with torch.inference_mode():
        reference, _ = model.prefill(prompt)
    assert float((reference - resident[0]).abs().max()) < 1e-4
