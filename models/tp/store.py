"""One tensor-parallel member's weights on disk, and the stores that hand them to it.

A member never builds the whole model: the coordinator cuts it and calls ``write_shard``,
which lays the member's slice out as one safetensors file per transformer layer plus
``extra.safetensors`` (what every forward pass needs: embedding slice, norms, head slice)
and ``meta.json``. One file per layer is what makes a sliding window cheap: a layer is one
sequential read (or one mapping) and one eviction. The member then opens the directory:

* ``open_store(d)`` -> ``ResidentStore``: every layer loaded at open, nothing ever reloaded.
* ``open_store(d, window=k)`` -> ``WindowStore`` (``window.py``): at most ``k`` layers
  resident, the next one prefetched in the background while the caller computes.

The files are plain safetensors (readable by ``safetensors.safe_open``) written by our own
few lines so the data section starts on a page boundary: tensors can then be used in place
from a mapping of the file. ``meta.json`` records every file's size and sha256; a store
checks them at open, so a truncated or corrupt file is a ``ModelFileError`` naming it, not
garbage weights. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from edgeswarm.placement.errors import InvalidInput, ModelFileError

Tensors = dict[str, torch.Tensor]

FORMAT = "edgeswarm.tp.store"
VERSION = 1
META_FILE = "meta.json"
EXTRA_FILE = "extra.safetensors"
#: The data section of every file starts at a multiple of this (the header is padded with
#: spaces, which the safetensors format allows), so large tensors are page-aligned.
ALIGN = 4096
#: A header larger than this is not one we wrote: refuse it before allocating.
_MAX_HEADER = 64 << 20

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def layer_file(i: int) -> str:
    return f"layer_{i:03d}.safetensors"


# --- writing -------------------------------------------------------------------------


def write_shard(directory: Path, layers: Sequence[Mapping[str, torch.Tensor]],
                extra: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> int:
    """One member's weights as files: layer_000.safetensors ..., extra.safetensors (what is
    always resident: embedding slice, norms, head slice), meta.json (num_layers + meta, JSON).
    Returns the parameter bytes written. Tensors are stored contiguous, in their dtype.

    ``meta.json`` is written last (and replaced atomically), so a directory whose writing was
    interrupted has no valid ``meta.json`` and fails to open instead of opening half-written.
    """
    directory = Path(directory)
    if isinstance(layers, Mapping) or not isinstance(layers, Sequence):
        raise InvalidInput(f"layers must be a sequence of name -> tensor mappings, got "
                           f"{type(layers).__name__}")
    try:
        meta_json = json.loads(json.dumps(dict(meta), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"shard meta must be JSON-serializable ({exc})") from None
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    files: dict[str, dict[str, Any]] = {}
    total = 0
    for name, tensors in [(layer_file(i), t) for i, t in enumerate(layers)] + [
            (EXTRA_FILE, extra)]:
        nbytes, size, digest = _write_safetensors(directory / name, tensors, what=name)
        files[name] = {"bytes": size, "sha256": digest}
        total += nbytes
    document = {"format": FORMAT, "version": VERSION, "num_layers": len(layers),
                "param_bytes": total, "files": files, "meta": meta_json}
    tmp = directory / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, directory / META_FILE)
    return total


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                       what: str) -> tuple[int, int, str]:
    """Write one file; returns (tensor bytes, file bytes, sha256 of the file)."""
    if not isinstance(tensors, Mapping):
        raise InvalidInput(f"{what}: expected a name -> tensor mapping, got "
                           f"{type(tensors).__name__}")
    arrays: list[tuple[str, torch.Tensor]] = []
    for key, value in tensors.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise InvalidInput(f"{what}: tensor names must be non-empty strings, got {key!r}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            raise InvalidInput(f"{what}: {key!r} must be a dense torch.Tensor, got "
                               f"{type(value).__name__}")
        if value.dtype not in _DTYPE_NAMES:
            raise InvalidInput(f"{what}: {key!r} has dtype {value.dtype}, which the store "
                               f"does not keep (use one of {sorted(_DTYPE_NAMES, key=str)})")
        arrays.append((key, value.detach().to("cpu").contiguous()))
    # Widest dtype first, then largest: big tensors start on aligned offsets.
    arrays.sort(key=lambda kv: (-kv[1].element_size(), -kv[1].nbytes, kv[0]))
    header: dict[str, Any] = {}
    offset = 0
    for key, value in arrays:
        header[key] = {"dtype": _DTYPE_NAMES[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    padded = -(-(8 + len(text)) // ALIGN) * ALIGN - 8
    text += b" " * (padded - len(text))
    digest = hashlib.sha256()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb", buffering=0) as fh:
        out = _AlignedWriter(fh)
        for piece in [memoryview(len(text).to_bytes(8, "little")), memoryview(text)] + [
                _byte_view(value) for _, value in arrays]:
            out.write(piece)
            digest.update(piece)
        out.flush()
    os.replace(tmp, path)
    return offset, 8 + len(text) + offset, digest.hexdigest()


class _AlignedWriter:
    """Writes in whole ``_CHUNK`` blocks at ``_CHUNK``-aligned offsets. The kernel sizes the
    page-cache folios of a buffered write by the write's length and alignment, so this
    lets it cache the file in 2 MB folios, which a mapping of the file (the window store)
    then maps one fault per 2 MB instead of one per 64 KB."""

    _CHUNK = 2 << 20

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.buffer = bytearray(self._CHUNK)
        self.used = 0

    def write(self, data: memoryview) -> None:
        while len(data):
            n = min(len(data), self._CHUNK - self.used)
            self.buffer[self.used:self.used + n] = data[:n]
            self.used += n
            data = data[n:]
            if self.used == self._CHUNK:
                self.flush()

    def flush(self) -> None:
        view = memoryview(self.buffer)[:self.used]
        while len(view):
            view = view[self.fh.write(view):]
        self.used = 0


def _byte_view(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1).view(torch.uint8)
    return flat.numpy().data


# --- reading -------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tensor in a file: where its bytes lie relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class FileLayout:
    """A parsed safetensors header: what the file holds and where its data starts."""

    path: Path
    data_start: int
    entries: tuple[Entry, ...]

    @property
    def param_bytes(self) -> int:
        return sum(e.end - e.begin for e in self.entries)


def parse_header(path: Path, head: bytes, file_size: int) -> FileLayout:
    """Validate a safetensors header (``head`` starts at byte 0 of the file)."""
    if len(head) < 8:
        raise ModelFileError(f"{path}: truncated safetensors file ({file_size} bytes)")
    n = int.from_bytes(head[:8], "little")
    if n > _MAX_HEADER or 8 + n > file_size:
        raise ModelFileError(f"{path}: corrupt safetensors header (claims {n} bytes in a "
                             f"{file_size}-byte file); rewrite the shard")
    if len(head) < 8 + n:
        raise ModelFileError(f"{path}: truncated safetensors header")
    try:
        header = json.loads(head[8:8 + n])
    except ValueError as exc:
        raise ModelFileError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_size = file_size - 8 - n
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{path}: corrupt safetensors entry {name!r}: {spec!r}") from None
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size \
                or end - begin != nbytes:
            raise ModelFileError(f"{path}: tensor {name!r} lies outside the file or has the "
                                 f"wrong size (offsets {begin}..{end}, {data_size} data bytes)")
        entries.append(Entry(name, dtype, shape, begin, end))
    return FileLayout(path, 8 + n, tuple(entries))


def read_layout(path: Path) -> FileLayout:
    """Parse the header of ``path`` without reading its data."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) == 8:
                head += fh.read(min(int.from_bytes(head, "little"), _MAX_HEADER))
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing; rewrite the shard (write_shard)") from None
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read ({exc})") from None
    return parse_header(path, head, size)


def tensors_from_buffer(layout: FileLayout, buffer: torch.Tensor) -> Tensors:
    """The tensors of ``layout`` as views into ``buffer`` (the whole file as uint8)."""
    out: Tensors = {}
    for e in layout.entries:
        start = layout.data_start + e.begin
        raw = buffer[start:layout.data_start + e.end]
        itemsize = torch.empty(0, dtype=e.dtype).element_size()
        if start % itemsize:  # a file someone else wrote, misaligned: copy that tensor
            raw = raw.clone()
        out[e.name] = raw.view(e.dtype).view(e.shape)
    return out


def read_file(path: Path, expect: Mapping[str, Any] | None = None) -> Tensors:
    """Read ``path`` into fresh memory with one sequential read; the tensors are views of
    one buffer, so dropping them returns it at once. ``expect`` (size, sha256) is checked."""
    try:
        with open(path, "rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            if expect is not None and size != expect["bytes"]:
                raise ModelFileError(f"{path} has {size} bytes, meta.json says "
                                     f"{expect['bytes']}: the file is truncated or was "
                                     f"replaced; rewrite the shard")
            buffer = torch.empty(size, dtype=torch.uint8)
            view = buffer.numpy().data
            got = 0
            while got < size:
                n = fh.readinto(view[got:])
                if not n:
                    raise ModelFileError(f"{path} shrank while being read")
                got += n
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing; rewrite the shard (write_shard)") from None
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read ({exc})") from None
    if expect is not None and hashlib.sha256(view).hexdigest() != expect["sha256"]:
        raise ModelFileError(f"{path} is corrupt (sha256 differs from meta.json); rewrite "
                             f"the shard")
    n = int.from_bytes(view[:8], "little") if size >= 8 else 0
    layout = parse_header(path, bytes(view[:8 + min(n, _MAX_HEADER)]), size)
    return tensors_from_buffer(layout, buffer)


def hash_file(path: Path, chunk: int = 8 << 20) -> str:
    """sha256 of ``path`` streamed in chunks (no more than ``chunk`` bytes held at once)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardMeta:
    """``meta.json``, checked."""

    directory: Path
    num_layers: int
    param_bytes: int
    files: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.directory / name

    def expect(self, name: str) -> dict[str, Any]:
        return self.files[name]


def read_meta(directory: Path) -> ShardMeta:
    """Read and check ``directory/meta.json``; every listed file must exist with its size."""
    directory = Path(directory)
    path = directory / META_FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(f"{path} is missing: {directory} is not a written shard (or its "
                             f"writing was interrupted); rewrite it with write_shard") from None
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} cannot be read as JSON ({exc})") from None
    try:
        if document["format"] != FORMAT or document["version"] != VERSION:
            raise ModelFileError(f"{path}: format {document['format']!r} version "
                                 f"{document['version']!r}, expected {FORMAT!r} {VERSION}")
        num_layers = int(document["num_layers"])
        files = {str(k): {"bytes": int(v["bytes"]), "sha256": str(v["sha256"])}
                 for k, v in document["files"].items()}
        meta = dict(document["meta"])
        param_bytes = int(document["param_bytes"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"{path} is malformed ({exc!r}); rewrite the shard") from None
    wanted = [layer_file(i) for i in range(num_layers)] + [EXTRA_FILE]
    missing = [name for name in wanted if name not in files]
    if num_layers < 0 or missing:
        raise ModelFileError(f"{path} does not list {missing or num_layers}; rewrite the shard")
    for name in wanted:
        try:
            size = (directory / name).stat().st_size
        except FileNotFoundError:
            raise ModelFileError(f"{directory / name} is missing; rewrite the shard "
                                 f"(write_shard)") from None
        if size != files[name]["bytes"]:
            raise ModelFileError(f"{directory / name} has {size} bytes, {META_FILE} says "
                                 f"{files[name]['bytes']}: truncated or replaced; rewrite the "
                                 f"shard")
    return ShardMeta(directory, num_layers, param_bytes, files, meta)


def verify_files(shard: ShardMeta, names: Sequence[str]) -> None:
    """Check the sha256 of ``names`` against ``meta.json`` (streamed, little memory)."""
    for name in names:
        if hash_file(shard.path(name)) != shard.files[name]["sha256"]:
            raise ModelFileError(f"{shard.path(name)} is corrupt (sha256 differs from "
                                 f"{META_FILE}); rewrite the shard")


# --- the stores ----------------------------------------------------------------------


class LayerStore(Protocol):
    """What a member program needs from its weights, whatever keeps them in memory."""

    num_layers: int
    meta: dict[str, Any]

    def extra(self) -> Tensors: ...            # always resident
    def layer(self, i: int) -> Tensors: ...    # layer i's tensors
    def param_bytes(self) -> int: ...          # extra + every layer, as stored
    def resident_bytes(self) -> int: ...       # parameter bytes resident right now
    def close(self) -> None: ...


def check_layer_index(i: object, num_layers: int) -> int:
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_layers:
        raise InvalidInput(f"layer index must be an int in [0, {num_layers}), got {i!r}")
    return i


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in tensors.values())


class ResidentStore:
    """Every layer read into memory at open; ``layer(i)`` is a dictionary lookup."""

    def __init__(self, directory: Path, verify: bool = True) -> None:
        shard = read_meta(directory)
        self.directory = shard.directory
        self.num_layers = shard.num_layers
        self.meta = shard.meta
        self._param_bytes = shard.param_bytes

        def load(name: str) -> Tensors:
            return read_file(shard.path(name), shard.expect(name) if verify else None)

        self._extra: Tensors | None = load(EXTRA_FILE)
        self._layers: list[Tensors] | None = [load(layer_file(i))
                                               for i in range(self.num_layers)]

    def extra(self) -> Tensors:
        if self._extra is None:
            raise InvalidInput(f"the store of {self.directory} is closed")
        return self._extra

    def layer(self, i: int) -> Tensors:
        if self._layers is None:
            raise InvalidInput(f"the store of {self.directory} is closed")
        return self._layers[check_layer_index(i, self.num_layers)]

    def param_bytes(self) -> int:
        return self._param_bytes

    def resident_bytes(self) -> int:
        if self._layers is None or self._extra is None:
            return 0
        return tensor_bytes(self._extra) + sum(tensor_bytes(t) for t in self._layers)

    def close(self) -> None:
        self._extra = None
        self._layers = None


def open_store(directory: Path, window: int | None = None, *,
               verify: bool = True) -> LayerStore:
    """window=None: every layer loaded at open (ResidentStore). window=k >= 1: at most k layers
    resident (WindowStore); layer(i) returns layer i (loading it if the prefetch has not),
    evicts layers outside [i, i+k) and starts prefetching i+1 (cyclically: after the last
    layer comes 0, the next forward pass) from disk in the background while the caller
    computes. The dict returned by layer(i) stays valid until layer(j) is called for a j
    with i outside [j, j+k).

    ``verify`` checks every file's sha256 against ``meta.json`` once, at open.
    """
    if window is None:
        return ResidentStore(directory, verify=verify)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise InvalidInput(f"window must be an int >= 1 (layers kept resident) or None "
                           f"(all), got {window!r}")
    from edgeswarm.models.tp.window import WindowStore

    return WindowStore(directory, window, verify=verify)
