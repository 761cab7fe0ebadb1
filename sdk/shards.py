"""From a plan to the files devices load: stages exported once, a manifest per generation.

:class:`ShardCache` exports each stage of a partition for its device's runtime and keeps
the files by what they contain (the stage's tasks and runtime), so a re-plan after a
device leaves exports only the stages that really changed. :func:`manifest_for` wires
the stages into a pipeline manifest: rank 0 is the coordinator, which sends the model's
inputs to the first stage and receives the last stage's outputs.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from edgeswarm.device_agent.artifacts import ArtifactServer
from edgeswarm.device_agent.manifest import (
    COORDINATOR,
    Artifact,
    CodecRef,
    LinkShape,
    Manifest,
    Shard,
)
from edgeswarm.models.partition import Partition, Stage, StageFile, export
from edgeswarm.placement.errors import InvalidInput

log = logging.getLogger("edgeswarm.sdk")

Key = tuple[tuple[str, ...], str, str]
#: A stage's codecs: (one per input it receives, one per output it sends); None: no codec.
StageCodecs = tuple[list[CodecRef] | None, list[CodecRef] | None]


class ShardCache:
    """Exported stages of one model, by (tasks, runtime, variant), served to the devices."""

    def __init__(self, server: ArtifactServer, example_inputs: Sequence[Any],
                 calibration: Sequence[Any] | None = None,
                 directory: Path | None = None) -> None:
        self.server = server
        self.example_inputs = list(example_inputs)
        self.calibration = calibration
        self.dir = directory or Path(tempfile.mkdtemp(prefix="edgeswarm-shards-"))
        self._files: dict[Key, tuple[StageFile, Artifact]] = {}

    def artifacts(self, part: Partition, runtime: Mapping[str, str]) -> list[Artifact]:
        """The artifact of every stage of ``part`` (exported now if not yet)."""
        missing = [s for s in part.stages if self._key(s, runtime) not in self._files]
        if missing:
            # each stage is exported on the inputs the whole pipeline gives it
            inputs = part.stage_inputs(*self.example_inputs)
            calib = (part.stage_inputs(*self.calibration)
                     if self.calibration is not None else None)
            for stage in missing:
                one = Partition((stage,), part.input_names, part.output_spec,
                                part.output_index)
                rt = runtime.get(stage.device, "onnx")
                out = self.dir / f"{len(self._files):03d}"
                files = export(one, inputs[stage.index], out, rt,
                               calibration=calib[stage.index] if calib else None)
                art = self.server.add(files[0].path, name=f"{stage.device}-{files[0].path.name}")
                self._files[self._key(stage, runtime)] = (files[0], art)
            log.info("exported %d stage(s) of %d", len(missing), len(part.stages))
        return [self._files[self._key(s, runtime)][1] for s in part.stages]

    @staticmethod
    def _key(stage: Stage, runtime: Mapping[str, str]) -> Key:
        return tuple(stage.tasks), runtime.get(stage.device, "onnx"), stage.variant


def manifest_for(part: Partition, artifacts: Sequence[Artifact], runtime: Mapping[str, str],
                 *, deployment: str, generation: int, model: str, store: tuple[str, int],
                 links: Mapping[str, LinkShape] | None = None,
                 timeout_s: float = 30.0,
                 codecs: Sequence[StageCodecs] | None = None) -> Manifest:
    """The pipeline manifest of ``part``: rank 0 the coordinator, then each device in the
    order it first appears; stage k receives from stage k-1's rank and sends to k+1's.
    ``codecs``: per stage, the codecs of its inputs and outputs (see
    :mod:`edgeswarm.codec_plans`)."""
    ranks: dict[str, int] = {COORDINATOR: 0}
    for stage in part.stages:
        ranks.setdefault(stage.device, len(ranks))
    shards = []
    for k, (stage, art) in enumerate(zip(part.stages, artifacts, strict=True)):
        prev = ranks[part.stages[k - 1].device] if k > 0 else 0
        nxt = ranks[part.stages[k + 1].device] if k + 1 < len(part.stages) else 0
        recv, send = codecs[k] if codecs is not None else (None, None)
        shards.append(Shard(id=f"stage{k}", device=stage.device,
                            runtime=cast(Any, runtime.get(stage.device, "onnx")),
                            artifact=art, recv_from=[prev], send_to=[nxt],
                            recv_codecs=recv, send_codecs=send))
    if len(ranks) < 2:
        raise InvalidInput("the plan uses no device")
    return Manifest(deployment=deployment, generation=generation, model=model,
                    store_host=store[0], store_port=store[1], world_size=len(ranks),
                    ranks=ranks, shards=shards, timeout_s=timeout_s,
                    links=dict(links or {}))
