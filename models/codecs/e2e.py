"""A model split over two devices with a codec on the cut edge: what the testbed runs.

:func:`split_with_codec` cuts a model after one task into two stages with
:func:`edgeswarm.models.partition.partition` and puts a codec between them:

- the **sender** runs stage 0 and the codec's encoder (:meth:`CodecSplit.send`: inputs ->
  bytes on the wire);
- the **receiver** runs the codec's decoder and stage 1 (:meth:`CodecSplit.receive`:
  bytes -> outputs). For a learned codec, stage 1 is a copy of the model's tail with the
  weights fine-tuned for that codec; the model itself is left unchanged.

:attr:`CodecSplit.plan` is the matching two-device plan with the codec named on the cut
edge (what the planner would emit), for the simulator and for deployment. Nothing here
touches the network: the testbed carries :meth:`~CodecSplit.send`'s bytes over its
emulated link and hands them to :meth:`~CodecSplit.receive` on the other device.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgeswarm.models.codecs.base import Codec
from edgeswarm.models.codecs.learned import LearnedCodec
from edgeswarm.models.graph import Traced, trace
from edgeswarm.models.partition import Partition, partition
from edgeswarm.placement.cluster import DeviceId
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.taskgraph import TaskId


@dataclass(frozen=True)
class CodecSplit:
    """A model in two stages with ``codec`` on the edge ``edge`` between them."""

    partition: Partition
    codec: Codec
    #: the receiver's stage module (the tuned tail copy for a learned codec)
    tail: nn.Module
    plan: Plan
    #: the cut edge: (the sender's last task, the receiver's first task)
    edge: tuple[TaskId, TaskId]

    @property
    def head(self) -> nn.Module:
        """The sender's stage module."""
        return self.partition.stages[0].module

    @property
    def devices(self) -> tuple[DeviceId, DeviceId]:
        first, second = self.partition.devices
        return first, second

    def send(self, *inputs: torch.Tensor) -> bytes:
        """Sender: run stage 0 on the model's inputs and encode the activation."""
        with torch.inference_mode():
            (activation,) = self.head(*inputs)
        return self.codec.encode(activation.numpy())

    def receive(self, payload: bytes) -> torch.Tensor:
        """Receiver: decode the activation and run stage 1; returns the model's output."""
        activation = torch.from_numpy(self.codec.decode(payload))
        with torch.inference_mode():
            outputs = self.tail(activation)
        return self.partition.assemble(outputs)

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Both ends in this process (a check; the testbed puts a link in between)."""
        return self.receive(self.send(*inputs))


def split_with_codec(module: nn.Module, example_inputs: Sequence[torch.Tensor], split: str,
                     codec: Codec, devices: tuple[str, str] = ("sender", "receiver"),
                     traced: Traced | None = None) -> CodecSplit:
    """Cut ``module`` after task ``split`` onto ``devices`` with ``codec`` on the cut.

    Raises InvalidInput when the cut would carry more than one activation (a residual
    crossing it), or when a learned codec was trained for another cut.
    """
    traced = traced or trace(module, example_inputs)
    ids: list[str] = [t.id for t in traced.graph.tasks]
    if split not in ids or ids.index(split) == len(ids) - 1:
        raise InvalidInput(f"cannot cut after {split!r}: it must be a task of the model "
                           f"other than the last ({', '.join(ids[:-1])})")
    k = ids.index(split)
    sender, receiver = DeviceId(devices[0]), DeviceId(devices[1])
    assignments: dict[TaskId, tuple[DeviceId, ...]] = {
        TaskId(t): (sender if i <= k else receiver,) for i, t in enumerate(ids)}
    edge = (TaskId(split), TaskId(ids[k + 1]))
    crossing = [e for e in traced.graph.edges
                if ids.index(e.src) <= k < ids.index(e.dst)]
    if [(e.src, e.dst) for e in crossing] != [edge]:
        raise InvalidInput(f"cutting after {split!r} carries {len(crossing)} activations "
                           f"({', '.join(f'{e.src}->{e.dst}' for e in crossing)}); a codec "
                           f"split needs exactly one")
    plan = Plan(assignments, {edge: codec.full_name} if codec.name != "none" else {},
                policy="split_with_codec")
    part = partition(module, example_inputs, plan, traced)
    tail: nn.Module = part.stages[1].module
    if isinstance(codec, LearnedCodec):
        if codec.split != split:
            raise InvalidInput(f"codec {codec.full_name!r} was trained for the cut after "
                               f"{codec.split!r}, not {split!r}")
        tail = codec.load_tail(copy.deepcopy(tail))
    return CodecSplit(part, codec, tail.eval(), plan, edge)
