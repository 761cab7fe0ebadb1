"""Artifacts: the model files a manifest names by sha256, fetched and verified before use.

Device side, ``ArtifactStore`` downloads an artifact (``http://``, ``https://`` or
``file://``), reads at most its declared size, checks size and sha256, and only then moves
it atomically into a cache named by hash; a file that does not match never reaches the
cache. Coordinator side, ``ArtifactServer`` serves a directory of files by their sha256
over HTTP. Nothing fetched is ever unpickled: the files are ONNX, TFLite or safetensors.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO

from edgeswarm.device_agent._signing import Rejected
from edgeswarm.device_agent.manifest import Artifact
from edgeswarm.placement.errors import InvalidInput

log = logging.getLogger("edgeswarm.agent.artifacts")

CHUNK = 1 << 20
_HASH_PATH = re.compile(r"/([0-9a-f]{64})")


class BadArtifact(Rejected):
    """An artifact could not be fetched, or is not the file the manifest names."""

    def __init__(self, detail: str) -> None:
        super().__init__("bad_artifact", detail)


def sha256_of(path: Path) -> str:
    """The sha256 of a file, as lowercase hex."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    """A cache directory of verified artifacts, named ``<sha256><suffix of name>``.

    The suffix is kept because runtimes choose a loader by it (``.onnx``, ``.tflite``).
    The cache holds at most ``max_bytes``; the least recently used files go first.
    """

    def __init__(self, cache_dir: str | Path, max_bytes: int = 2 << 30,
                 timeout_s: float = 30.0) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._verified: dict[Path, tuple[int, int]] = {}   # path -> (size, mtime_ns) checked
        self._lock = threading.Lock()

    def path_of(self, artifact: Artifact) -> Path:
        return self.cache_dir / (artifact.sha256 + Path(artifact.name).suffix)

    def fetch(self, artifact: Artifact) -> Path:
        """The verified local file of ``artifact``: from the cache, else downloaded.

        Raises BadArtifact naming the expected and actual size or sha256, or why the
        download failed; nothing that fails verification is left in the cache.
        """
        target = self.path_of(artifact)
        if self._cached(target, artifact):
            os.utime(target)   # most recently used
            log.debug("artifact %s: cache hit %s", artifact.name, target)
            return target
        if artifact.size > self.max_bytes:
            raise BadArtifact(f"{artifact.name} is {artifact.size} bytes, more than the "
                              f"artifact cache holds ({self.max_bytes}); raise max_bytes")
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=".part-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = self._download(artifact, out)
            if size != artifact.size:
                raise BadArtifact(f"{artifact.name} from {artifact.url} is {size} bytes; "
                                  f"the manifest says {artifact.size}")
            if digest != artifact.sha256:
                raise BadArtifact(f"{artifact.name} from {artifact.url} has sha256 {digest}; "
                                  f"the manifest expects {artifact.sha256}. Refusing it")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        self._remember(target)
        log.info("artifact %s: fetched %d bytes from %s", artifact.name, size, artifact.url)
        self._evict(keep=target)
        return target

    def _cached(self, target: Path, artifact: Artifact) -> bool:
        try:
            st = target.stat()
        except FileNotFoundError:
            return False
        if st.st_size == artifact.size:
            with self._lock:
                if self._verified.get(target) == (st.st_size, st.st_mtime_ns):
                    return True
            if sha256_of(target) == artifact.sha256:
                self._remember(target)
                return True
        log.warning("artifact %s: cached %s is corrupt; fetching it again",
                    artifact.name, target)
        target.unlink(missing_ok=True)
        return False

    def _remember(self, target: Path) -> None:
        st = target.stat()
        with self._lock:
            self._verified[target] = (st.st_size, st.st_mtime_ns)

    def _download(self, artifact: Artifact, out: IO[bytes]) -> tuple[str, int]:
        """Copy at most size + 1 bytes into ``out``; return (sha256, bytes read)."""
        limit = artifact.size
        h = hashlib.sha256()
        size = 0
        try:
            # the scheme is checked by Artifact: http(s) or file, never ftp or custom
            with urllib.request.urlopen(artifact.url, timeout=self.timeout_s) as response:  # noqa: S310
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise BadArtifact(f"{artifact.url} announces {declared} bytes; the "
                                      f"manifest says {artifact.name} is {limit}")
                while chunk := response.read(min(CHUNK, limit + 1 - size)):
                    size += len(chunk)
                    if size > limit:
                        raise BadArtifact(f"{artifact.url} sends more than the {limit} bytes "
                                          f"the manifest declares for {artifact.name}; "
                                          "stopped reading")
                    h.update(chunk)
                    out.write(chunk)
        except urllib.error.HTTPError as e:
            e.close()
            raise BadArtifact(f"cannot fetch {artifact.name} from {artifact.url}: "
                              f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise BadArtifact(f"cannot fetch {artifact.name} from {artifact.url}: {reason}"
                              ) from None
        return h.hexdigest(), size

    def _evict(self, keep: Path) -> None:
        files = [p for p in self.cache_dir.iterdir()
                 if p.is_file() and not p.name.startswith(".")]
        stats = {p: p.stat() for p in files}
        total = sum(st.st_size for st in stats.values())
        for p in sorted(files, key=lambda p: stats[p].st_mtime_ns):
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= stats[p].st_size
            with self._lock:
                self._verified.pop(p, None)
            log.info("artifact cache: evicted %s (%d bytes)", p.name, stats[p].st_size)


class ArtifactServer:
    """Serves the files of ``directory`` named by sha256 at ``http://host:port/<sha256>``.

    Only ``/<64 lowercase hex>`` paths are served, so no other file can be reached.
    ``advertise_host`` is the host put into URLs (default: ``host``), for a server bound
    to ``0.0.0.0``.
    """

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None) -> None:
        self.directory = Path(directory)
        self.host = host
        self.advertise_host = advertise_host or host
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise InvalidInput("the artifact server is not started; call start() first")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.advertise_host}:{self.port}"

    def start(self) -> ArtifactServer:
        if self._server is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        directory = self.directory

        class Handler(_HashHandler):
            root = directory

        self._server = ThreadingHTTPServer((self.host, self._port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="edgeswarm-artifact-server", daemon=True)
        self._thread.start()
        log.info("artifact server on %s serving %s", self.url, self.directory)
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def add(self, path: str | Path, name: str | None = None) -> Artifact:
        """Copy (or hard-link) a file into the served directory; return its Artifact."""
        src = Path(path)
        if not src.is_file():
            raise InvalidInput(f"artifact file {src} does not exist")
        digest = sha256_of(src)
        dst = self.directory / digest
        if not dst.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{digest}.tmp"
            try:
                os.link(src, tmp)
            except OSError:
                shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        return Artifact(name=name or src.name, sha256=digest, size=dst.stat().st_size,
                        url=f"{self.url}/{digest}")

    def __enter__(self) -> ArtifactServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _HashHandler(BaseHTTPRequestHandler):
    root: Path
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        match = _HASH_PATH.fullmatch(self.path)
        path = self.root / match.group(1) if match else None
        if path is None or not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, "no artifact with that sha256")
            return
        size = path.stat().st_size
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if body:
            with path.open("rb") as f:
                for chunk in _chunks(f):
                    self.wfile.write(chunk)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("artifact server: %s - %s", self.address_string(), format % args)


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk
