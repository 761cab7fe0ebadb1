"""Artifact store against a real ArtifactServer (and lying servers) on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeswarm.device_agent.artifacts import ArtifactServer, ArtifactStore, BadArtifact
from edgeswarm.device_agent.manifest import Artifact
from edgeswarm.placement.errors import InvalidInput, ProtocolError


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        extra = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not extra:
            return
        time.sleep(0.01)
    raise AssertionError(f"threads left running: {extra}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ArtifactServer]:
    with ArtifactServer(tmp_path / "served") as s:
        yield s


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "cache", timeout_s=5.0)


def make_file(tmp_path: Path, name: str, size: int, seed: int = 0) -> Path:
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def cache_entries(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in store.cache_dir.iterdir())   # temp files included


def test_fetch_then_cached_without_network(tmp_path: Path, server: ArtifactServer,
                                           store: ArtifactStore) -> None:
    src = make_file(tmp_path, "stage0.onnx", 300_000)
    artifact = server.add(src)
    assert artifact.url == f"http://127.0.0.1:{server.port}/{artifact.sha256}"
    assert artifact.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (artifact.name, artifact.size) == ("stage0.onnx", 300_000)
    path = store.fetch(artifact)
    assert path.read_bytes() == src.read_bytes()
    assert path.name == artifact.sha256 + ".onnx"   # runtimes pick a loader by suffix
    server.stop()
    with pytest.raises(BadArtifact):   # the network really is gone ...
        ArtifactStore(tmp_path / "other", timeout_s=1.0).fetch(artifact)
    assert store.fetch(artifact) == path   # ... and the cache answers
    assert ArtifactStore(store.cache_dir).fetch(artifact) == path   # a new process too
    assert cache_entries(store) == [path.name]


def test_wrong_hash_is_refused_and_nothing_is_cached(tmp_path: Path, server: ArtifactServer,
                                                     store: ArtifactStore) -> None:
    good = server.add(make_file(tmp_path, "w.safetensors", 5000))
    claimed = hashlib.sha256(b"something else").hexdigest()
    lie = good.model_copy(update={"sha256": claimed})
    with pytest.raises(BadArtifact) as info:
        store.fetch(lie)
    assert info.value.reason == "bad_artifact" and isinstance(info.value, ProtocolError)
    assert good.sha256 in str(info.value) and claimed in str(info.value)
    assert cache_entries(store) == []


def test_short_file_is_refused(tmp_path: Path, server: ArtifactServer,
                               store: ArtifactStore) -> None:
    good = server.add(make_file(tmp_path, "a.onnx", 5000))
    with pytest.raises(BadArtifact, match="5000 bytes; the manifest says 6000"):
        store.fetch(good.model_copy(update={"size": 6000}))
    assert cache_entries(store) == []


def test_announced_oversize_is_refused_before_reading(tmp_path: Path, server: ArtifactServer,
                                                      store: ArtifactStore) -> None:
    good = server.add(make_file(tmp_path, "a.onnx", 50_000))
    with pytest.raises(BadArtifact, match="announces 50000 bytes"):
        store.fetch(good.model_copy(update={"size": 1000}))
    assert cache_entries(store) == []


class EndlessServer:
    """Answers any request with 200 and no length, then streams bytes until the peer
    hangs up (at most ``cap`` bytes); counts what it managed to send."""

    def __init__(self, cap: int = 256 << 20, respond: bool = True) -> None:
        self.cap, self.respond, self.sent = cap, respond, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10.0)
            conn.recv(65536)
            if self.respond:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
                chunk = b"\0" * 65536
                try:
                    while self.sent < self.cap:
                        conn.sendall(chunk)
                        self.sent += len(chunk)
                except OSError:
                    pass
            else:
                self.done.wait(10.0)

    def close(self) -> None:
        self.done.set()
        self.thread.join(10.0)
        self.sock.close()


def test_unannounced_oversize_download_is_cut_at_the_declared_size(
        tmp_path: Path, store: ArtifactStore) -> None:
    endless = EndlessServer()
    try:
        artifact = Artifact(name="x.onnx", sha256="0" * 64, size=100_000,
                            url=f"http://127.0.0.1:{endless.port}/{'0' * 64}")
        start = time.monotonic()
        with pytest.raises(BadArtifact, match="more than the 100000 bytes"):
            store.fetch(artifact)
        assert time.monotonic() - start < 5.0
        assert cache_entries(store) == []
    finally:
        endless.close()
    assert endless.sent < endless.cap   # the store hung up; it did not drain the stream


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    silent = EndlessServer(respond=False)
    try:
        store = ArtifactStore(tmp_path / "cache", timeout_s=0.3)
        artifact = Artifact(name="x.onnx", sha256="0" * 64, size=10,
                            url=f"http://127.0.0.1:{silent.port}/x")
        start = time.monotonic()
        with pytest.raises(BadArtifact, match="cannot fetch"):
            store.fetch(artifact)
        assert time.monotonic() - start < 3.0
        assert cache_entries(store) == []
    finally:
        silent.close()


def test_file_url(tmp_path: Path, store: ArtifactStore) -> None:
    src = make_file(tmp_path, "m.tflite", 2048)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    artifact = Artifact(name=src.name, sha256=digest, size=2048, url=src.as_uri())
    path = store.fetch(artifact)
    assert path.read_bytes() == src.read_bytes() and path.suffix == ".tflite"
    missing = artifact.model_copy(update={"url": (tmp_path / "gone.tflite").as_uri(),
                                          "sha256": "1" * 64})
    with pytest.raises(BadArtifact, match="cannot fetch"):
        store.fetch(missing)
    wrong = artifact.model_copy(update={"sha256": "2" * 64})
    with pytest.raises(BadArtifact, match="sha256"):
        store.fetch(wrong)
    assert cache_entries(store) == [path.name]


def test_unknown_hash_is_not_found(server: ArtifactServer, store: ArtifactStore) -> None:
    artifact = Artifact(name="a.onnx", sha256="3" * 64, size=1,
                        url=f"{server.url}/{'3' * 64}")
    with pytest.raises(BadArtifact, match="HTTP 404"):
        store.fetch(artifact)


@pytest.mark.parametrize("path", ["/", "/../served", "/etc/passwd", "/" + "A" * 64,
                                  "/{h}/", "/{h}x", "/{h}?x=1"])
def test_server_serves_only_hash_paths(tmp_path: Path, server: ArtifactServer,
                                       path: str) -> None:
    artifact = server.add(make_file(tmp_path, "a.onnx", 10))
    (server.directory / "secret").write_bytes(b"no")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path.format(h=artifact.sha256))
        response = conn.getresponse()
        response.read()
        assert response.status == 404
        conn.request("HEAD", f"/{artifact.sha256}")
        response = conn.getresponse()
        response.read()
        assert (response.status, response.getheader("Content-Length")) == (200, "10")
    finally:
        conn.close()


def test_corrupt_cache_entry_is_fetched_again(tmp_path: Path, server: ArtifactServer,
                                              store: ArtifactStore,
                                              caplog: pytest.LogCaptureFixture) -> None:
    src = make_file(tmp_path, "a.onnx", 4096)
    artifact = server.add(src)
    path = store.fetch(artifact)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="edgeswarm.agent.artifacts"):
        assert store.fetch(artifact) == path
    assert "corrupt" in caplog.text
    assert path.read_bytes() == src.read_bytes()


def test_cache_evicts_least_recently_used(tmp_path: Path, server: ArtifactServer) -> None:
    store = ArtifactStore(tmp_path / "cache", max_bytes=2500, timeout_s=5.0)
    arts = [server.add(make_file(tmp_path, f"a{i}.onnx", 1000, seed=i)) for i in range(3)]
    paths = []
    for i, a in enumerate(arts[:2]):
        paths.append(store.fetch(a))
        os.utime(paths[-1], ns=(i * 10**9, i * 10**9))   # a0 older than a1
    store.fetch(arts[0])   # a0 is used again: now a1 is the least recent
    store.fetch(arts[2])
    assert cache_entries(store) == sorted([paths[0].name, store.path_of(arts[2]).name])
    too_big = arts[0].model_copy(update={"size": 3000})
    with pytest.raises(BadArtifact, match="raise max_bytes"):
        store.fetch(too_big)


def test_server_add_checks_and_reuses(tmp_path: Path) -> None:
    server = ArtifactServer(tmp_path / "served")
    src = make_file(tmp_path, "a.onnx", 10)
    with pytest.raises(InvalidInput, match="start"):
        server.add(src)
    with server:
        first = server.add(src)
        again = server.add(src, name="b.onnx")
        assert (again.sha256, again.url, again.name) == (first.sha256, first.url, "b.onnx")
        with pytest.raises(InvalidInput, match="does not exist"):
            server.add(tmp_path / "nope")
    server.stop()   # twice is fine


def test_concurrent_fetches_of_one_artifact(tmp_path: Path, server: ArtifactServer,
                                            store: ArtifactStore) -> None:
    artifact = server.add(make_file(tmp_path, "a.onnx", 200_000))
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker(fn: Callable[[Artifact], Path]) -> None:
        try:
            results.append(fn(artifact))
        except BaseException as e:   # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(store.fetch,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10.0)
    assert errors == [] and len(set(results)) == 1
    assert cache_entries(store) == [results[0].name]
