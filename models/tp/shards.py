"""A tensor-parallel group as deployable shards: one member's slice in one file.

The SDK slices a zoo transformer for a group of devices (:func:`member_files`: one
safetensors file per member holding only its slice, and the JSON ``params`` its shard
carries); an agent reads them back (:func:`unpack`) and runs :func:`member_program` with
the all-reduces of its ``tp_group`` over the deployment generation's data plane
(:mod:`edgeswarm.device_agent.tp_group`, the group builders ``tp-bert`` and ``tp-llama``).

A request runs the whole model on the group: minilm's sentence embeddings (the encoder,
then mean pooling and L2 normalization as the zoo module does), smollm2's logits for every
position (what ``LlamaForCausalLM.forward`` returns). Every member computes the result;
the manifest sends only the first member's on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeswarm.models.tp.bert import BertMember, bert_shape, slice_bert
from edgeswarm.models.tp.collective import Collective
from edgeswarm.models.tp.llama import LlamaMember, MemberShard, llama_shape, slice_llama
from edgeswarm.models.tp.split import split_layers
from edgeswarm.models.zoo.llama import LlamaForCausalLM
from edgeswarm.models.zoo.minilm import SentenceEncoder
from edgeswarm.placement.errors import InvalidInput, ModelFileError

Tensors = dict[str, torch.Tensor]
Run = Any  # executor.Run: list[np.ndarray] -> list[np.ndarray]

#: The builder each model kind deploys with.
BUILDER = {"bert": "tp-bert", "llama": "tp-llama"}


def kind_of(module: nn.Module) -> str | None:
    """The tensor-parallel kind of ``module`` ("bert", "llama"), None if it has none."""
    if isinstance(module, SentenceEncoder):
        return "bert"
    if isinstance(module, LlamaForCausalLM):
        return "llama"
    return None


def max_members(module: nn.Module) -> int:
    """The largest group ``module`` splits over (one attention head each at least)."""
    if isinstance(module, SentenceEncoder):
        return int(module.bert.config.num_heads)
    if isinstance(module, LlamaForCausalLM):
        return int(module.config.num_heads)
    raise InvalidInput(f"{type(module).__name__} has no tensor-parallel split: deploy a "
                       "zoo transformer (minilm, smollm2) on a group")


def slice_module(module: nn.Module, speeds: Sequence[float]) -> list[MemberShard]:
    """Each member's slice of ``module``, in proportion to ``speeds`` (group order)."""
    if isinstance(module, SentenceEncoder):
        split = split_layers(bert_shape(module.bert.config), speeds)
        return slice_bert(module.bert, split)
    if isinstance(module, LlamaForCausalLM):
        return slice_llama(module, split_layers(llama_shape(module.config), speeds))
    max_members(module)  # raises: no split for this module
    raise AssertionError("unreachable")


def member_files(module: nn.Module, speeds: Sequence[float], directory: Path,
                 allreduce: str = "auto") -> list[tuple[Path, dict[str, Any]]]:
    """Write each member's slice to ``directory``; (file, shard params) per member."""
    kind = kind_of(module)
    if kind is None:
        max_members(module)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for rank, shard in enumerate(slice_module(module, speeds)):
        path = directory / f"tp{len(speeds)}-{rank}.safetensors"
        out.append((path, pack(shard, path, allreduce)))
    return out


def pack(shard: MemberShard, path: Path, allreduce: str = "auto") -> dict[str, Any]:
    """Write one member's weights as one safetensors file; returns its shard params."""
    from safetensors.numpy import save_file

    tensors = {f"extra.{k}": v.contiguous().numpy() for k, v in shard.extra.items()}
    for i, layer in enumerate(shard.layers):
        tensors.update({f"layer.{i}.{k}": v.contiguous().numpy() for k, v in layer.items()})
    save_file(tensors, str(path))
    return {"meta": shard.meta, "num_layers": len(shard.layers), "allreduce": allreduce}


class MemoryStore:
    """A member's slice held in memory, as :class:`~edgeswarm.models.tp.store.LayerStore`."""

    def __init__(self, layers: list[Tensors], extra: Tensors, meta: dict[str, Any]) -> None:
        self.num_layers = len(layers)
        self.meta = meta
        self._layers = layers
        self._extra = extra

    def extra(self) -> Tensors:
        return self._extra

    def layer(self, i: int) -> Tensors:
        if not 0 <= i < self.num_layers:
            raise InvalidInput(f"layer {i} is not in 0..{self.num_layers - 1}")
        return self._layers[i]

    def param_bytes(self) -> int:
        parts = [self._extra, *self._layers]
        return sum(t.numel() * t.element_size() for p in parts for t in p.values())

    def resident_bytes(self) -> int:
        return self.param_bytes()

    def close(self) -> None:
        self._layers, self._extra = [], {}


def unpack(weights: Mapping[str, np.ndarray], params: Mapping[str, Any]) -> MemoryStore:
    """The store a shard's file and params describe; ModelFileError if they disagree."""
    try:
        num_layers = int(params["num_layers"])
        meta = dict(params["meta"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"tensor-parallel shard params lack {exc}: re-deploy") from None
    layers: list[Tensors] = [{} for _ in range(num_layers)]
    extra: Tensors = {}
    for key, value in weights.items():
        where, _, name = key.partition(".")
        t = torch.from_numpy(np.ascontiguousarray(value))
        if where == "extra" and name:
            extra[name] = t
            continue
        index, _, name = name.partition(".")
        if where != "layer" or not index.isdigit() or not name or int(index) >= num_layers:
            raise ModelFileError(f"tensor-parallel shard file has an unexpected tensor "
                                 f"{key!r} (expected extra.NAME or layer.I.NAME, "
                                 f"I < {num_layers})")
        layers[int(index)][name] = t
    if any(not layer for layer in layers) or not extra:
        raise ModelFileError("tensor-parallel shard file lacks a layer or the shared "
                             "weights: re-export it")
    return MemoryStore(layers, extra, meta)


def member_program(store: MemoryStore, coll: Collective) -> Run:
    """What one member runs per request: the whole model's output, all-reducing with
    ``coll``. Minilm: sentence embeddings (the encoder, mean pooling, L2 normalization as
    the zoo module does); smollm2: the logits of every position."""
    kind = store.meta.get("kind")
    if kind == "bert":
        bert = BertMember(store, coll)

        def encode(inputs: list[np.ndarray]) -> list[np.ndarray]:
            ids, mask = _two(inputs, "input_ids and attention_mask")
            hidden = bert.forward(ids, mask)
            keep = mask.unsqueeze(-1).type_as(hidden)
            pooled = (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)
            return [nn.functional.normalize(pooled, p=2.0, dim=1).numpy()]

        return encode
    if kind == "llama":
        llama = LlamaMember(store, coll)

        def logits(inputs: list[np.ndarray]) -> list[np.ndarray]:
            if len(inputs) != 1:
                raise InvalidInput(f"smollm2 takes one input (input_ids), got {len(inputs)}")
            return [llama.prefill(torch.from_numpy(inputs[0]).long()).numpy()]

        return logits
    raise ModelFileError(f"tensor-parallel shard of unknown kind {kind!r} (known: "
                         f"{', '.join(BUILDER)})")


def _two(inputs: list[np.ndarray], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if len(inputs) != 2:
        raise InvalidInput(f"minilm takes two inputs ({what}), got {len(inputs)}")
    return torch.from_numpy(inputs[0]).long(), torch.from_numpy(inputs[1]).long()
