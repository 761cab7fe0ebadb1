"""A device's deployments: what the agent runs for the coordinator, one per deployment id.

:meth:`Deployments.deploy` takes a manifest through every step before the device serves
it: this device has a rank, its runtimes are installed, each shard's artifact is fetched
and verified (sha256 and size, :class:`ArtifactStore`), the generation's gloo group is
joined (blocking until every rank is in) and the shards are loaded into a
:class:`ShardExecutor` that serves on its own thread. A new generation of a deployment
replaces the old one once it is up. :meth:`teardown` stops serving and leaves the group.

Failures are raised to the caller (the agent), which answers the coordinator:
``Rejected`` ("bad_artifact", "unknown_deployment") for refused input, other ``Error``s
for deployments that could not be brought up. A pipeline that breaks while serving (a lost
peer) is reported through ``on_error``.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgeswarm.device_agent.artifacts import ArtifactStore
from edgeswarm.device_agent.manifest import Manifest
from edgeswarm.device_agent.metrics import AgentMetrics
from edgeswarm.device_agent.protocol import Deployed, ErrorEvent, Rejected, ShardStats
from edgeswarm.device_agent.shard_codecs import artifacts as codec_artifacts
from edgeswarm.device_agent.shard_codecs import file_key as codec_file
from edgeswarm.placement.errors import DeviceLost, Error, RuntimeNotAvailable

log = logging.getLogger("edgeswarm.agent.deployments")


def reason_of(exc: Error) -> str:
    """The ErrorEvent reason for a deployment that could not be brought up."""
    if isinstance(exc, Rejected):
        return exc.reason
    if isinstance(exc, DeviceLost):
        return "device_lost"
    if isinstance(exc, RuntimeNotAvailable):
        return "runtime_unavailable"
    return "deploy_failed"


@dataclass
class _Running:
    manifest: Manifest
    plane: Any
    executor: Any
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    reported: dict[str, tuple[int, float, int, int]] = field(default_factory=dict)


class Deployments:
    """The deployments of device ``device``; thread-safe, deploys run one at a time."""

    def __init__(self, device: str, store: ArtifactStore, metrics: AgentMetrics, *,
                 runtimes: list[str], speed: float = 1.0, data_host: str = "127.0.0.1",
                 threads: int | None = None,
                 on_error: Callable[[ErrorEvent], None] = lambda _e: None) -> None:
        self.device = device
        self._store = store
        self._metrics = metrics
        self._runtimes = set(runtimes)
        if importlib.util.find_spec("safetensors") is not None:
            self._runtimes.add("safetensors")  # weights for a registered builder (never pickle)
        self._speed = speed
        self._threads = threads  # of each shard's runtime; None: the runtime's default
        self._host = data_host
        self._on_error = on_error
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()  # the ticker and a teardown may both report

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._running)

    def deploy(self, manifest: Manifest) -> Deployed:
        """Bring ``manifest`` up on this device (see the module doc); return its Deployed."""
        from edgeswarm.device_agent.executor import ShardExecutor, open_plane

        dep = manifest.deployment
        with self._lock:
            old = self._running.get(dep)
        if old is not None and old.manifest == manifest:  # a resent command: answer again
            return self._deployed(manifest, 0.0)
        t0 = time.perf_counter()
        manifest.rank_of(self.device)  # InvalidInput if this device has no rank
        shards = manifest.shards_of(self.device)
        missing = sorted({s.runtime for s in shards} - self._runtimes)
        if missing:
            raise RuntimeNotAvailable(f"device {self.device!r} has no runtime "
                                      f"{', '.join(missing)} (it has "
                                      f"{', '.join(sorted(self._runtimes))})")
        files = {s.id: self._store.fetch(s.artifact) for s in shards}
        files.update({codec_file(a): self._store.fetch(a) for a in codec_artifacts(shards)})
        plane = open_plane(manifest, self.device, host=self._host)
        try:
            executor = ShardExecutor(manifest, self.device, files, plane, speed=self._speed,
                                     threads=self._threads)
        except BaseException:
            _close_quietly(plane)
            raise
        run = _Running(manifest, plane, executor)
        run.thread = threading.Thread(target=self._serve, args=(run,), daemon=True,
                                      name=f"edgeswarm-serve-{dep}-{manifest.generation}")
        with self._lock:
            old = self._running.pop(dep, None)
            self._running[dep] = run
        if old is not None:  # the new generation replaces the old one; the old executor may
            # wait for rank 0 of its generation to leave, so it is closed in the background
            threading.Thread(target=self._close, args=(old,), daemon=True,
                             name=f"edgeswarm-retire-{dep}-{old.manifest.generation}").start()
        run.thread.start()
        self._metrics.shards(self.shard_count())
        return self._deployed(manifest, time.perf_counter() - t0)

    def teardown(self, deployment: str) -> None:
        """Stop serving ``deployment`` and leave its group; Rejected if there is none."""
        with self._lock:
            run = self._running.pop(deployment, None)
            known = sorted(self._running)
        if run is None:
            raise Rejected("unknown_deployment", f"no deployment {deployment!r} on "
                           f"{self.device!r} (it has: {', '.join(known) or 'none'})")
        self._close(run)
        self._metrics.shards(self.shard_count())

    def close_all(self) -> None:
        with self._lock:
            running = list(self._running.values())
            self._running.clear()
        for run in running:
            self._close(run)
        self._metrics.shards(0)

    def shard_count(self) -> int:
        with self._lock:
            return sum(len(r.manifest.shards_of(self.device)) for r in self._running.values())

    def report(self) -> tuple[int, dict[str, ShardStats]]:
        """Requests served and per-shard stats of the running deployments; feeds the
        metrics with what happened since the last report."""
        with self._lock:
            running = list(self._running.values())
        requests, shards = 0, {}
        for run in running:
            shards.update(self._report(run))
            requests += run.executor.requests
        return requests, shards

    def _deployed(self, manifest: Manifest, load_s: float) -> Deployed:
        return Deployed(deployment=manifest.deployment, generation=manifest.generation,
                        shards=[s.id for s in manifest.shards_of(self.device)], load_s=load_s)

    def _serve(self, run: _Running) -> None:
        dep = run.manifest.deployment
        try:
            run.executor.serve(run.stop)  # returns on shutdown, stop, or a lost peer
            lost = run.executor.error
            if lost is not None and not run.stop.is_set():
                # The pipeline is broken: leave the group now, so that the peers still
                # waiting on this device (rank 0 for the last stage's output) fail at once
                # rather than after the manifest's timeout, and the coordinator re-plans.
                _close_quietly(run.plane)
                self._on_error(ErrorEvent(reason="device_lost", detail=str(lost)[:2000],
                                          deployment=dep))
        except Exception as exc:
            log.exception("deployment %s: the executor failed", dep)
            self._on_error(ErrorEvent(reason="executor_failed", detail=str(exc)[:2000],
                                      deployment=dep))

    def _close(self, run: _Running) -> None:
        """Stop serving and leave the group; after rank 0's shutdown the thread has ended."""
        run.stop.set()
        thread = run.thread if run.thread is not threading.current_thread() else None
        if thread is not None:
            thread.join(min(run.manifest.timeout_s, 1.0))
        _close_quietly(run.plane)
        if thread is not None and thread.is_alive():
            thread.join(1.0)
            if thread.is_alive():  # blocked in a receive that gloo cannot interrupt
                log.warning("deployment %s: the executor is still waiting for its peers; it "
                            "ends when they leave or its timeout runs out",
                            run.manifest.deployment)
        self._report(run)

    def _report(self, run: _Running) -> dict[str, ShardStats]:
        with self._report_lock:
            return self._report_locked(run)

    def _report_locked(self, run: _Running) -> dict[str, ShardStats]:
        stats: dict[str, ShardStats] = dict(run.executor.stats)
        for i, (shard, s) in enumerate(stats.items()):
            runs, compute, b_in, b_out = run.reported.get(shard, (0, 0.0, 0, 0))
            if i == 0 and s.runs > runs:  # a request is counted at the device's first shard
                per_run = (s.compute_s - compute) / (s.runs - runs)
                for _ in range(min(s.runs - runs, 10_000)):
                    self._metrics.request(per_run)
            self._metrics.bytes(max(0, s.bytes_out - b_out), max(0, s.bytes_in - b_in))
            run.reported[shard] = (s.runs, s.compute_s, s.bytes_in, s.bytes_out)
        return stats


def _close_quietly(plane: Any) -> None:
    try:
        plane.close()
    except Exception:
        log.debug("closing a data plane failed", exc_info=True)
