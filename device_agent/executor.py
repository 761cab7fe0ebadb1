"""The shard executor: runs one device's shards of one deployment generation.

For each request a device runs its shards in manifest (pipeline) order. A shard's inputs
are the tensors received from each rank of ``recv_from``, in that order; its outputs go,
all of them, to every rank of ``send_to``. A rank equal to the device's own hands tensors
from one local shard to a later one without the network. With ``tp_group`` set, each
output is summed over the group (a tensor-parallel shard holds a partial result).

Shards load by runtime: ``onnx``/``onnx-int8`` in ONNX Runtime, ``tflite-int8`` in LiteRT,
``snn`` (a spiking network, :mod:`edgeswarm.models.spiking`) in the spiking executor,
``safetensors``/``torch`` through a registered builder that gets the weights (read with
``safetensors.numpy``: nothing is ever unpickled) and the shard's JSON ``params``.

The coordinator stops a pipeline by sending request id :data:`wire.SHUTDOWN`; each stage
forwards it to the ranks its remaining shards send to and stops.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.device_agent import wire
from edgeswarm.device_agent.dataplane import DataPlane, Shaping
from edgeswarm.device_agent.manifest import Manifest, Shard
from edgeswarm.device_agent.protocol import ShardStats
from edgeswarm.device_agent.shard_codecs import ShardCodecs
from edgeswarm.placement.errors import (
    DeviceLost,
    InvalidInput,
    ModelFileError,
    ProtocolError,
    RuntimeNotAvailable,
)

log = logging.getLogger("edgeswarm.agent.executor")

Arrays = list[np.ndarray]
Run = Callable[[Arrays], Arrays]
Builder = Callable[[dict[str, np.ndarray], dict[str, Any]], Run]

#: Builders for "safetensors"/"torch" shards: name -> fn(weights, params) -> run(inputs).
BUILDERS: dict[str, Builder] = {}


def register_builder(name: str, fn: Builder) -> None:
    """Make ``fn`` the builder that manifests name ``name``."""
    if BUILDERS.get(name, fn) is not fn or name in GROUP_BUILDERS:
        raise InvalidInput(f"builder {name!r} is already registered; pick another name")
    BUILDERS[name] = fn


#: A tensor-parallel member: fn(weights, params, plane, tp_group) -> run(inputs). The run
#: all-reduces with the group itself (several times per request), so the executor does not
#: sum its outputs.
GroupBuilder = Callable[[dict[str, np.ndarray], dict[str, Any], DataPlane, list[int]], Run]
GROUP_BUILDERS: dict[str, GroupBuilder] = {}
#: Modules that register the builders of edgeswarm's own shard kinds, imported on first use.
_BUILDER_MODULES = {"tp-llama": "edgeswarm.device_agent.tp_group",
                    "tp-bert": "edgeswarm.device_agent.tp_group"}


def register_group_builder(name: str, fn: GroupBuilder) -> None:
    """Make ``fn`` the tensor-parallel member builder that manifests name ``name``."""
    if GROUP_BUILDERS.get(name, fn) is not fn or name in BUILDERS:
        raise InvalidInput(f"builder {name!r} is already registered; pick another name")
    GROUP_BUILDERS[name] = fn


def shaping(manifest: Manifest, device: str) -> dict[int, Shaping]:
    """The emulated links out of ``device`` (manifest ``links`` "src->dst"), by rank."""
    out = {}
    for key, link in manifest.links.items():
        src, dst = key.split("->")
        if src == device:
            out[manifest.rank_of(dst)] = Shaping(link.latency_s, link.bandwidth_Bps)
    return out


def open_plane(manifest: Manifest, device: str, host: str | None = None) -> DataPlane:
    """Join the manifest's generation as ``device`` (blocks until every rank joined)."""
    return DataPlane(manifest.store_host, manifest.store_port, manifest.rank_of(device),
                     manifest.world_size, manifest.generation, manifest.timeout_s,
                     shaping=shaping(manifest, device), host=host,
                     deployment=manifest.deployment)


@dataclass
class _Counters:
    runs: int = 0
    compute_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0


class ShardExecutor:
    """Runs ``device``'s shards of ``manifest`` over ``plane``, one request at a time.

    ``files``: shard id -> the verified artifact. ``speed`` < 1 emulates a slower device:
    after each run it sleeps ``compute_s * (1/speed - 1)``, counted in ``compute_s``.
    ``idle_timeout_s``: how long to wait for the next request (no limit by default, an idle
    pipeline is normal; a dead or closed peer still ends the wait at once). Within a
    request, every receive and send waits at most the plane's timeout.
    """

    def __init__(self, manifest: Manifest, device: str, files: Mapping[str, Path],
                 plane: DataPlane, speed: float = 1.0, threads: int | None = None, *,
                 idle_timeout_s: float = math.inf,
                 clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not speed > 0:
            raise InvalidInput(f"speed must be > 0 (1.0: this device as it is), got {speed}")
        self.rank = manifest.rank_of(device)
        if (plane.rank, plane.generation) != (self.rank, manifest.generation):
            raise InvalidInput(f"the data plane is rank {plane.rank} of generation "
                               f"{plane.generation}, but {device!r} is rank {self.rank} of "
                               f"generation {manifest.generation}")
        self.deployment = manifest.deployment
        self.shards = manifest.shards_of(device)
        if not self.shards:
            raise InvalidInput(f"deployment {manifest.deployment!r} has no shard on {device!r}")
        _check_wiring(self.shards, self.rank)
        self.plane = plane
        self.speed = speed
        self.idle_timeout_s = idle_timeout_s
        self.requests = 0
        #: the DeviceLost that ended serve(), if one did
        self.error: DeviceLost | None = None
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._counters = {s.id: _Counters() for s in self.shards}
        self._runs = {s.id: _load(s, files, threads, plane) for s in self.shards}
        self._codecs = {s.id: ShardCodecs.load(s, files) for s in self.shards}

    @property
    def stats(self) -> dict[str, ShardStats]:
        """Per shard: runs, compute seconds, bytes received and sent."""
        with self._lock:
            return {k: ShardStats(runs=c.runs, compute_s=c.compute_s, bytes_in=c.bytes_in,
                                  bytes_out=c.bytes_out) for k, c in self._counters.items()}

    def run_once(self) -> bool:
        """Serve one request through every local shard; False once a shutdown arrived."""
        local: deque[Arrays] = deque()
        request: int | None = None
        for i, shard in enumerate(self.shards):
            count = self._counters[shard.id]
            inputs: Arrays = []
            for src in shard.recv_from:
                if src == self.rank:
                    inputs += local.popleft()
                    continue
                before = self.plane.bytes_received
                rid, arrays = self.plane.recv(
                    src, timeout_s=self.idle_timeout_s if request is None else None)
                with self._lock:
                    count.bytes_in += self.plane.bytes_received - before
                if rid == wire.SHUTDOWN:
                    self._forward_shutdown(i)
                    return False
                if request is not None and rid != request:
                    raise ProtocolError(f"shard {shard.id!r} got request {rid} from rank {src} "
                                        f"while serving request {request}: the stages are "
                                        "out of step; redeploy")
                request = rid
                coded = self._codecs[shard.id]
                inputs += (arrays if coded.recv is None else
                           self._timed(shard, partial(coded.decode, arrays, len(inputs))))
            outputs = self._compute(shard, inputs)
            if shard.tp_group and shard.builder not in GROUP_BUILDERS:
                outputs = [self.plane.all_reduce(o, shard.tp_group) for o in outputs]
            wired: Arrays | None = None  # the outputs as they go to other ranks
            for dst in shard.send_to:
                if dst == self.rank:
                    local.append(outputs)
                    continue
                assert request is not None  # _check_wiring: the first input is remote
                if wired is None:
                    coded = self._codecs[shard.id]
                    wired = (outputs if coded.send is None else
                             self._timed(shard, partial(coded.encode, outputs)))
                sent = self.plane.send(wired, dst, request)
                with self._lock:
                    count.bytes_out += sent
        self.requests += 1
        return True

    def serve(self, stop: threading.Event) -> None:
        """Serve requests until ``stop`` is set (checked between requests), a shutdown
        arrives, or a peer is lost (kept in ``error``); other errors propagate."""
        while not stop.is_set():
            try:
                if not self.run_once():
                    log.info("deployment %s: shutdown after %d requests", self.deployment,
                             self.requests)
                    return
            except DeviceLost as exc:
                log.warning("deployment %s: %s", self.deployment, exc)
                # a copy without the traceback: the failed operation's frames hold gloo's
                # work objects, which keep the group's sockets open after plane.close(),
                # so the peers waiting on this device would not learn that it left
                self.error = DeviceLost(str(exc))
                return

    def _compute(self, shard: Shard, inputs: Arrays) -> Arrays:
        outputs = self._timed(shard, lambda: self._runs[shard.id](inputs))
        with self._lock:
            self._counters[shard.id].runs += 1
        return list(outputs)

    def _timed(self, shard: Shard, step: Callable[[], Arrays]) -> Arrays:
        """Run ``step`` (the shard, or a codec of its edges) as this device's compute: an
        emulated slower device stretches it by 1/speed; counted in ``compute_s``."""
        start = self._clock()
        out = step()
        took = self._clock() - start
        if self.speed < 1:
            extra = took * (1 / self.speed - 1)
            self._sleep(extra)
            took += extra
        with self._lock:
            self._counters[shard.id].compute_s += took
        return out

    def _forward_shutdown(self, first: int) -> None:
        """Pass the shutdown on to every rank that shards ``first``.. would have fed."""
        ranks = {d for s in self.shards[first:] for d in s.send_to if d != self.rank}
        for dst in sorted(ranks):
            try:
                self.plane.send([], dst, wire.SHUTDOWN)
            except DeviceLost as exc:  # already gone: nothing left to stop there
                log.debug("shutdown not forwarded: %s", exc)


def _check_wiring(shards: list[Shard], rank: int) -> None:
    """Every shard has inputs, the first one from the network, and local hand-offs pair up."""
    queued = 0
    for i, shard in enumerate(shards):
        if not shard.recv_from:
            raise InvalidInput(f"shard {shard.id!r} receives from no rank: give it recv_from")
        if i == 0 and shard.recv_from[0] == rank:
            raise InvalidInput(f"shard {shard.id!r} is this device's first shard but takes its "
                               "first input from this device: list the remote rank first")
        queued -= shard.recv_from.count(rank)
        if queued < 0:
            raise InvalidInput(f"shard {shard.id!r} takes a local input that no earlier shard "
                               "on this device sends")
        queued += shard.send_to.count(rank)


def _load(shard: Shard, files: Mapping[str, Path], threads: int | None,
          plane: DataPlane) -> Run:
    path = files.get(shard.id)
    if path is None:
        raise InvalidInput(f"no artifact file for shard {shard.id!r}: fetch it first")
    if shard.runtime in ("onnx", "onnx-int8"):
        from edgeswarm.models.runtimes.onnx_runtime import OnnxExecutable

        return OnnxExecutable(Path(path), shard.runtime, threads).run
    if shard.runtime == "tflite-int8":
        from edgeswarm.models.runtimes.litert import LiteRTExecutable

        return LiteRTExecutable(Path(path), threads=threads).run
    if shard.runtime == "snn":  # a whole converted model: .snn (safetensors + JSON header)
        from edgeswarm.models.spiking.runtime import SnnExecutable

        return SnnExecutable.open(Path(path)).run
    name = shard.builder or ""
    if name in _BUILDER_MODULES and name not in BUILDERS and name not in GROUP_BUILDERS:
        importlib.import_module(_BUILDER_MODULES[name])
    group_builder = GROUP_BUILDERS.get(name)
    if group_builder is not None:
        if not shard.tp_group or plane.rank not in shard.tp_group:
            raise InvalidInput(f"shard {shard.id!r}: builder {name!r} runs a tensor-parallel "
                               f"member; its tp_group must list this device's rank "
                               f"{plane.rank}, got {shard.tp_group}")
        return group_builder(_weights(Path(path)), dict(shard.params), plane,
                             list(shard.tp_group))
    builder = BUILDERS.get(name)
    if builder is None:
        known = ", ".join(sorted({*BUILDERS, *GROUP_BUILDERS, *_BUILDER_MODULES}))
        raise InvalidInput(f"shard {shard.id!r} names builder {shard.builder!r}, which this "
                           f"agent does not have (known: {known})")
    return builder(_weights(Path(path)), dict(shard.params))


def _weights(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise RuntimeNotAvailable("safetensors shards need the safetensors package: "
                                  "pip install safetensors") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"{path} is not a valid safetensors file ({exc}); re-export "
                             "the shard's weights") from None
