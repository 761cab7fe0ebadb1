"""Rank 0 of a deployment generation: the coordinator's end of the pipeline.

Every manifest gives rank 0 to the coordinator. :class:`Rank0` joins the generation's gloo
group in a thread (the join blocks until every device has joined too, so it runs while the
coordinator waits for the devices' answers), then feeds requests to the ranks whose shards
take input from rank 0 and collects the outputs of the ranks whose shards send to it.
:meth:`Rank0.shutdown` sends the shutdown message down the pipeline, waits for it to come
back (every stage has then stopped serving) and leaves the group.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from edgeswarm.device_agent.manifest import COORDINATOR, Manifest, Shard
from edgeswarm.placement.errors import DeviceLost, Error

if TYPE_CHECKING:
    from edgeswarm.device_agent.dataplane import DataPlane

log = logging.getLogger("edgeswarm.agent.rank0")


class Rank0:
    """Joins ``manifest``'s group as rank 0 from a thread started at construction."""

    def __init__(self, manifest: Manifest, host: str | None = None) -> None:
        self.manifest = manifest
        self.error = ""
        self._host = host
        self._plane: DataPlane | None = None
        self._request_ids = itertools.count()
        self.fed = _ranks(manifest, lambda shard: 0 in shard.recv_from)
        self.feeding = _ranks(manifest, lambda shard: 0 in shard.send_to)
        self._thread = threading.Thread(target=self._join, daemon=True,
                                        name=f"edgeswarm-join-{manifest.deployment}")
        self._thread.start()

    def _join(self) -> None:
        from edgeswarm.device_agent.executor import open_plane

        try:
            self._plane = open_plane(self.manifest, COORDINATOR, host=self._host)
        except Exception as exc:  # reported by joined(); the thread must not die silently
            self.error = f"rank 0 could not join the group: {exc}"

    def joined(self, timeout_s: float) -> bool:
        """Wait for the join; False (with ``error`` set) if it failed or is still waiting."""
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.error = f"rank 0 did not join the group within {timeout_s:.1f} s"
            return False
        return self._plane is not None

    def infer(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One request through the pipeline: the outputs sent back to rank 0, in order."""
        plane = self._joined_plane()
        request_id = next(self._request_ids)
        for rank in self.fed:
            plane.send(list(arrays), rank, request_id)
        outputs: list[np.ndarray] = []
        for rank in self.feeding:
            rid, got = plane.recv(rank)
            if rid != request_id:
                raise DeviceLost(f"deployment {self.manifest.deployment!r}: rank {rank} "
                                 f"answered request {rid}, expected {request_id}; redeploy it")
            outputs.extend(got)
        return outputs

    def shutdown(self) -> None:
        """Stop every stage (the shutdown travels down and back) and leave the group."""
        from edgeswarm.device_agent import wire

        plane = self._plane
        if plane is None:
            return
        try:
            for rank in self.fed:
                plane.send([], rank, wire.SHUTDOWN)
            for rank in self.feeding:
                plane.recv(rank)
        except Error as exc:
            log.warning("deployment %s: the pipeline did not shut down cleanly: %s",
                        self.manifest.deployment, exc)
        finally:
            self.close()

    def close(self) -> None:
        """Leave the group; a join still waiting ends at the manifest's timeout."""
        self._thread.join(self.manifest.timeout_s + 5)
        plane, self._plane = self._plane, None
        if plane is not None:
            plane.close()

    def _joined_plane(self) -> DataPlane:
        if self._plane is None:
            raise DeviceLost(f"deployment {self.manifest.deployment!r}: rank 0 is not in the "
                             f"group ({self.error or 'still joining'})")
        return self._plane


def _ranks(manifest: Manifest, wired: Callable[[Shard], bool]) -> list[int]:
    """Ranks holding a shard for which ``wired(shard)`` holds, in pipeline order, once."""
    out: list[int] = []
    for shard in manifest.shards:
        rank = manifest.ranks[shard.device]
        if wired(shard) and rank not in out:
            out.append(rank)
    return out
