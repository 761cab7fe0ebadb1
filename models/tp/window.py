"""The sliding-window weight scheduler: at most ``k`` layers resident, the next ones fetched
in the background while the caller computes (TPI-LLM's memory scheduler, issue 6 item 4).

Callers walk the layers 0..L-1 once per forward pass (prefill, then every decoded token),
so with ``k < L`` every layer comes in again on every pass. How it comes in is the whole
design; ``mode`` picks one of two, measured side by side in docs/tp.md:

``"mmap"`` (the default): each layer file is mapped once (private, copy-on-write) and its
  tensors are views of the mapping: weights are never copied, the compute reads the page
  cache. Loading a layer is mapping its pages (touching one byte per page); evicting it is
  ``MADV_DONTNEED``, which takes its pages out of this process at once (its RSS drops) and
  leaves the tensors *valid* (touching one maps its pages again from the file). What makes
  this cheap is the page cache's folio size: a file cached in 2 MB folios is mapped one
  fault per 2 MB (7 ms for all of SmolLM2's 425 MB of layers here), one cached by
  ``read()`` in small folios one fault per 64 KB (35-85 ms: as much as a token's compute
  on one core). So the mappings are ``MADV_HUGEPAGE`` (a page-cache miss then reads a
  2 MB folio), the files are written in 2 MB-aligned blocks (``store.write_shard``), and
  at open the layers' cached pages are dropped and read back through the mapping while
  their sha256 is checked. (A file system that caches in small folios only — ext4 on
  older kernels — pays the 64 KB faults: measure on the device before relying on this.)
  A shard must not be truncated in place while mapped (touching a vanished page is
  SIGBUS); ``write_shard`` replaces files by rename, which mappings survive.
``"read"``: each layer is read with one sequential ``readinto`` into one of ``k``
  preallocated slots (a ring), so memory never goes back through the allocator (glibc
  keeps freed blocks under its dynamic mmap threshold). The copy is CPU work (about 40 ms
  for 425 MB here), which on a device limited to one core adds to every token.

Either way a loader thread brings in the layers ahead of the caller (``i+1 .. i+k-1``);
its system calls and page faults release the GIL, so it overlaps the compute exactly as
far as the work is I/O (a disk read) rather than CPU (a copy, a fault on cached pages).

What RSS does not count is the page cache. With ``keep_page_cache=True`` (the default) the
evicted layers stay cached by the kernel, which drops them under memory pressure; with
False an evicted layer's cached pages are dropped at once (``POSIX_FADV_DONTNEED``), so
the host's memory really goes down and every reload reads the disk — the honest setting
for a device whose RAM cannot hold the model, and the one where the prefetch matters.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import threading
from collections import deque
from pathlib import Path
from typing import Any, Literal

import torch

from edgeswarm.models.tp.store import (
    EXTRA_FILE,
    META_FILE,
    FileLayout,
    Tensors,
    check_layer_index,
    layer_file,
    read_file,
    read_layout,
    read_meta,
    tensor_bytes,
    tensors_from_buffer,
    verify_files,
)
from edgeswarm.placement.errors import InvalidInput, ModelFileError

Mode = Literal["mmap", "read"]
MODES: tuple[Mode, ...] = ("mmap", "read")

_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def _madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on the pages covering ``[address, address + length)``. Through ctypes,
    which releases the GIL (``mmap.madvise`` holds it). Advice is a hint: a kernel without
    transparent huge pages ignores HUGEPAGE; a failed DONTNEED only leaves pages resident."""
    start = address - address % _PAGE
    _libc.madvise(start, length + (address - start), advice)


def _drop_cache(path: Path) -> None:
    """Ask the kernel to drop ``path``'s clean cached pages (they are re-read on demand)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class _Mapped:
    """One layer file mapped for the store's lifetime; its tensors view the mapping."""

    def __init__(self, layout: FileLayout, expect_sha256: str | None) -> None:
        try:
            with open(layout.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                # Whatever folios the cache holds go: they come back as 2 MB ones below.
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                self.map = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
        except OSError as exc:
            raise ModelFileError(f"{layout.path} cannot be mapped ({exc})") from None
        self.path = layout.path
        self.buffer = torch.frombuffer(self.map, dtype=torch.uint8)
        _madvise(self.buffer.data_ptr(), size, _MADV_HUGEPAGE)
        if expect_sha256 is not None:  # read through the mapping: 2 MB folios
            if hashlib.sha256(self.map).hexdigest() != expect_sha256:
                raise ModelFileError(f"{layout.path} is corrupt (sha256 differs from "
                                     f"{META_FILE}); rewrite the shard")
            self.evict(keep_page_cache=True)
        self.tensors = tensors_from_buffer(layout, self.buffer)

    def load(self) -> None:
        """Map every page (one read per page; a 2 MB folio maps in one fault)."""
        if self.buffer.numel():
            self.buffer[::_PAGE].max()

    def evict(self, keep_page_cache: bool) -> None:
        _madvise(self.buffer.data_ptr(), self.buffer.numel(), _MADV_DONTNEED)
        if not keep_page_cache:
            _drop_cache(self.path)


class WindowStore:
    """At most ``window`` layers resident (see the module docstring and ``open_store``).

    ``loads`` counts layers brought in, ``waits`` the calls to ``layer(i)`` that found
    layer ``i`` not there yet (the prefetch had not finished or not started).
    """

    def __init__(self, directory: Path, window: int, *, verify: bool = True,
                 mode: Mode = "mmap", keep_page_cache: bool = True) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidInput(f"window must be an int >= 1 (layers kept resident), got "
                               f"{window!r}")
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {MODES}, got {mode!r}")
        shard = read_meta(directory)
        names = [layer_file(i) for i in range(shard.num_layers)]
        if verify and mode == "read":
            verify_files(shard, names)
        self.directory = shard.directory
        self.num_layers = shard.num_layers
        self.meta: dict[str, Any] = shard.meta
        self.window = min(window, max(self.num_layers, 1))
        self.mode: Mode = mode
        self.keep_page_cache = keep_page_cache
        self._param_bytes = shard.param_bytes
        self._extra: Tensors = read_file(shard.path(EXTRA_FILE),
                                         shard.expect(EXTRA_FILE) if verify else None)
        self._layouts = [read_layout(shard.path(layer_file(i)))
                         for i in range(self.num_layers)]
        self._layer_bytes = [layout.param_bytes for layout in self._layouts]
        self._mapped: list[_Mapped] = []
        self._slots: list[torch.Tensor] = []
        self._slot_of: dict[int, int] = {}
        if mode == "mmap":
            self._mapped = [_Mapped(layout, shard.files[name]["sha256"] if verify else None)
                            for layout, name in zip(self._layouts, names, strict=True)]
        else:
            size = max((os.path.getsize(layout.path) for layout in self._layouts), default=0)
            self._slots = [torch.empty(size, dtype=torch.uint8) for _ in range(self.window)]
        # Shared with the loader thread, guarded by _cond.
        self._cond = threading.Condition()
        self._resident: dict[int, Tensors] = {}
        self._wanted: set[int] = set()
        self._queue: deque[int] = deque()
        self._loading: int | None = None
        self._error: BaseException | None = None
        self._closed = False
        self.loads = 0
        self.waits = 0
        self._thread = threading.Thread(target=self._run, name="edgeswarm-tp-window",
                                        daemon=True)
        self._thread.start()

    # --- the caller's side -----------------------------------------------------------

    def extra(self) -> Tensors:
        self._check_open()
        return self._extra

    def layer(self, i: int) -> Tensors:
        self._check_open()
        i = check_layer_index(i, self.num_layers)
        window = [(i + d) % self.num_layers for d in range(self.window)]
        with self._cond:
            self._raise_loader_error()
            self._wanted = set(window)
            for j in [j for j in self._resident if j not in self._wanted]:
                del self._resident[j]
                self._evict(j)
            self._queue = deque(j for j in window
                                if j not in self._resident and j != self._loading)
            if i not in self._resident:
                self.waits += 1
                if self._loading == i:
                    while i not in self._resident:
                        self._cond.wait()
                        self._raise_loader_error()
                else:  # not started: load it here rather than hand it to the thread
                    self._queue.remove(i)
                    if self.mode == "read":
                        self._claim(i)
                    self.loads += 1
                    try:
                        self._resident[i] = self._load(i)
                    except BaseException:
                        self._slot_of.pop(i, None)
                        raise
            self._cond.notify_all()
            return self._resident[i]

    def param_bytes(self) -> int:
        return self._param_bytes

    def resident_bytes(self) -> int:
        with self._cond:
            return tensor_bytes(self._extra) + sum(self._layer_bytes[j] for j in self._resident)

    def resident_layers(self) -> list[int]:
        with self._cond:
            return sorted(self._resident)

    def close(self) -> None:
        """Stop the loader and drop the weights. A mapping is unmapped once the last tensor
        viewing it is gone (never under a caller still holding one)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()
        self._thread.join()
        with self._cond:
            for j in list(self._resident):
                self._evict(j)
            self._resident.clear()
        self._mapped = []
        self._slots = []
        self._extra = {}

    def __enter__(self) -> WindowStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInput(f"the store of {self.directory} is closed")

    def _raise_loader_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _evict(self, j: int) -> None:
        """Give layer ``j``'s memory back (caller holds _cond)."""
        if self.mode == "mmap":
            self._mapped[j].evict(self.keep_page_cache)
        else:
            self._slot_of.pop(j, None)

    # --- loading: read mode's slots and the loader thread -----------------------------

    def _claim(self, j: int) -> int:
        """A free slot for layer ``j`` (caller holds _cond). A slot is busy while its layer
        is resident or being read; if a cancelled read holds the last one, wait for it."""
        while True:
            used = set(self._slot_of.values())
            free = [s for s in range(len(self._slots)) if s not in used]
            if free:
                self._slot_of[j] = free[0]
                return free[0]
            self._cond.wait()
            self._raise_loader_error()

    def _load(self, j: int) -> Tensors:
        """Bring layer ``j`` in (either thread; read mode: into its claimed slot)."""
        if self.mode == "mmap":
            self._mapped[j].load()
            return self._mapped[j].tensors
        buffer = self._slots[self._slot_of[j]]
        layout = self._layouts[j]
        try:
            with open(layout.path, "rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                if size > buffer.numel():
                    raise ModelFileError(f"{layout.path} grew to {size} bytes after open; "
                                         f"reopen the store")
                view = buffer.numpy().data
                got = 0
                while got < size:
                    n = fh.readinto(view[got:size])
                    if not n:
                        raise ModelFileError(f"{layout.path} shrank while being read; "
                                             f"reopen the store")
                    got += n
                if not self.keep_page_cache:
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise ModelFileError(f"{layout.path} cannot be read ({exc})") from None
        return tensors_from_buffer(layout, buffer)

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                j = self._queue[0]
                if j in self._resident or j not in self._wanted:
                    self._queue.popleft()
                    continue
                if self.mode == "read":
                    if len(self._slot_of) >= len(self._slots):  # wait for an eviction
                        self._cond.wait()
                        continue
                    self._claim(j)
                self._queue.popleft()
                self._loading = j
                self._cond.release()
                failure: BaseException | None = None
                try:
                    tensors = self._load(j)
                except BaseException as exc:  # raised by the caller's next layer()
                    failure = exc
                finally:
                    self._cond.acquire()
                self._loading = None
                self.loads += 1
                if failure is not None:
                    self._slot_of.pop(j, None)
                    self._error = failure
                elif j in self._wanted and not self._closed:
                    self._resident[j] = tensors
                else:
                    self._slot_of.pop(j, None)
                self._cond.notify_all()
