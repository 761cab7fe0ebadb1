"""Tensor-parallel members as the executor builds them: a shard's slice, its group's
all-reduces over the deployment generation's data plane.

A tensor-parallel shard names the group builder ``tp-bert`` or ``tp-llama``; its artifact
is one member's slice (:mod:`edgeswarm.models.tp.shards`) and its params carry the
all-reduce algorithm and the slowest link among the members. With ``"auto"`` the members
first time every algorithm together (:meth:`PlaneCollective.calibrate`) so the choice
rests on this group's real cost per call, not only on the links' figures.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeswarm.device_agent.dataplane import DataPlane, Shaping
from edgeswarm.device_agent.executor import Run, register_group_builder
from edgeswarm.models.tp.collective import PlaneCollective
from edgeswarm.models.tp.shards import BUILDER, member_program, unpack
from edgeswarm.placement.errors import InvalidInput

#: Calibration rounds at deploy: every member runs them at once, before the first request.
CALIBRATION_ROUNDS = 8


def build(weights: dict[str, np.ndarray], params: dict[str, Any], plane: DataPlane,
          group: list[int]) -> Run:
    """The member program of one shard, as the executor runs it."""
    store = unpack(weights, params)
    link = params.get("link")
    try:
        shaping = (Shaping(float(link["latency_s"]), float(link["bandwidth_Bps"]))
                   if link else None)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"tensor-parallel shard param 'link' {link!r} is not "
                           f"{{latency_s, bandwidth_Bps}} ({exc!r})") from None
    algorithm = str(params.get("allreduce", "auto"))
    coll = PlaneCollective(plane, group, algorithm, link=shaping)
    if algorithm == "auto" and len(group) > 1:
        coll.calibrate(rounds=CALIBRATION_ROUNDS)
    return member_program(store, coll)


for _name in BUILDER.values():
    register_group_builder(_name, build)
