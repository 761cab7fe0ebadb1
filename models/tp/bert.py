"""One member of a tensor-parallel group running a BERT encoder (MiniLM), Megatron-style.

Per layer: query/key/value column-parallel by heads (fused into one matrix with its bias),
the attention output projection row-parallel (a partial sum: one all-reduce, then the bias,
the residual and the LayerNorm, replicated); the feed-forward ``up`` column-parallel,
``down`` row-parallel (one all-reduce). The word embedding, half of MiniLM's parameters, is
vocabulary-parallel: each member looks up the tokens it owns and one all-reduce joins them
(adding zeros is exact), so the embeddings match the one-device model's bit for bit.

Functional torch over a :class:`~edgeswarm.models.tp.store.LayerStore`, one layer at a time
in order, so a sliding-window store can feed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F

from edgeswarm.models.tp.collective import Collective, Program, drive
from edgeswarm.models.tp.llama import MemberShard, Tensors
from edgeswarm.models.tp.split import LayerShape, MemberSlice, Split
from edgeswarm.models.zoo.bert import MASKED_SCORE, BertConfig, BertEncoder, EncoderLayer
from edgeswarm.placement.errors import InvalidInput, ModelFileError

if TYPE_CHECKING:
    from edgeswarm.models.tp.store import LayerStore

__all__ = ["KIND", "BertMember", "bert_shape", "slice_bert"]

KIND = "bert"
#: Per-layer tensors used after a piece's all-reduce: copied, so they outlive the window.
_SMALL = ("o_bias", "attn_norm", "attn_norm_bias", "down_bias", "ffn_norm", "ffn_norm_bias")


def bert_shape(config: BertConfig) -> LayerShape:
    return LayerShape(hidden=config.hidden_size, num_heads=config.num_heads,
                      num_kv_heads=config.num_heads, intermediate=config.intermediate_size,
                      vocab=config.vocab_size, mlp_matrices=2)


def slice_bert(encoder: BertEncoder, split: Split) -> list[MemberShard]:
    """Each member's slice of ``encoder`` (contiguous copies)."""
    cfg = encoder.config
    if split.shape != bert_shape(cfg):
        raise InvalidInput(f"the split was made for {split.shape}, the encoder is "
                           f"{bert_shape(cfg)}")
    d = cfg.hidden_size // cfg.num_heads
    out = []
    for rank, m in enumerate(split.members):
        (h0, h1), (c0, c1), (v0, v1) = m.q_heads, m.mlp, m.vocab
        rows = slice(h0 * d, h1 * d)
        layers: list[Tensors] = []
        for block in encoder.layers:
            layer = cast(EncoderLayer, block)
            att, ff = layer.attention, layer.feed_forward
            layers.append({k: t.detach().contiguous() for k, t in {
                "qkv": torch.cat((att.query.weight[rows], att.key.weight[rows],
                                  att.value.weight[rows])),
                "qkv_bias": torch.cat((att.query.bias[rows], att.key.bias[rows],
                                       att.value.bias[rows])),
                "o": att.output.weight[:, rows],
                "o_bias": att.output.bias,
                "attn_norm": att.norm.weight, "attn_norm_bias": att.norm.bias,
                "up": ff.up.weight[c0:c1], "up_bias": ff.up.bias[c0:c1],
                "down": ff.down.weight[:, c0:c1], "down_bias": ff.down.bias,
                "ffn_norm": ff.norm.weight, "ffn_norm_bias": ff.norm.bias,
            }.items()})
        emb = encoder.embeddings
        extra = {k: t.detach().clone().contiguous() for k, t in {
            "word": emb.word.weight[v0:v1], "position": emb.position.weight,
            "token_type": emb.token_type.weight[0], "norm": emb.norm.weight,
            "norm_bias": emb.norm.bias}.items()}
        meta = {"kind": KIND, "config": asdict(cfg), "rank": rank, "size": split.size,
                "slice": m.to_json()}
        out.append(MemberShard(layers, extra, meta))
    return out


class BertMember:
    """The member program; ``forward`` returns what ``BertEncoder.forward`` returns."""

    def __init__(self, store: LayerStore, coll: Collective) -> None:
        meta = store.meta
        if meta.get("kind") != KIND:
            raise ModelFileError(f"the shard holds a {meta.get('kind')!r} model, not {KIND!r}")
        try:
            self.config = BertConfig(**meta["config"])
            self.slice = MemberSlice.from_json(meta["slice"])
            rank, size = int(meta["rank"]), int(meta["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"the shard's meta.json is not a bert member's ({exc!r})"
                                 ) from None
        if (rank, size) != (coll.rank, coll.size):
            raise InvalidInput(f"the shard is member {rank} of {size}, the collective is "
                               f"member {coll.rank} of {coll.size}")
        if store.num_layers != self.config.num_layers:
            raise ModelFileError(f"the shard has {store.num_layers} layers, its config "
                                 f"{self.config.num_layers}")
        self.store = store
        self.coll = coll
        self.head_dim = self.config.hidden_size // self.config.num_heads
        self.n_heads = self.slice.q_heads[1] - self.slice.q_heads[0]
        self._extra = store.extra()
        self._v0 = self.slice.vocab[0]
        self._current: tuple[int, dict[str, Any]] | None = None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                micro_batches: int = 1) -> torch.Tensor:
        """Hidden states ``[N, L, H]`` for ``input_ids`` and ``attention_mask`` ``[N, L]``.

        ``micro_batches > 1`` cuts the batch into that many pieces that take turns: while
        one piece's all-reduce is on the wire (on the communication thread), the next
        piece computes, so the wait for the peers and the link hides behind work.
        """
        self._check(input_ids, attention_mask)
        if micro_batches < 1:
            raise InvalidInput(f"micro_batches must be >= 1, got {micro_batches}")
        pieces = list(zip(input_ids.tensor_split(micro_batches),
                          attention_mask.tensor_split(micro_batches), strict=True))
        programs = [self._program(ids, mask) for ids, mask in pieces if ids.shape[0]]
        return torch.cat(drive(self.coll, programs))

    def timed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              micro_batches: int = 1, clock: Callable[[], float] = time.perf_counter
              ) -> tuple[torch.Tensor, float]:
        start = clock()
        out = self.forward(input_ids, attention_mask, micro_batches)
        return out, clock() - start

    def _program(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Program:
        """One piece through the encoder, as a generator of the partial sums it needs
        all-reduced. Layer weights are fetched once per layer and the small ones copied,
        so pieces at neighbouring layers never hold an evicted window slot."""
        cfg = self.config
        e = self._extra
        word = e["word"]
        local = input_ids - self._v0
        mine = (local >= 0) & (local < word.shape[0])
        x = yield word[local.clamp(0, word.shape[0] - 1)] * mine[..., None]
        positions = torch.arange(input_ids.shape[1])
        x = x + e["position"][positions] + e["token_type"]
        hidden = F.layer_norm(x, x.shape[-1:], e["norm"], e["norm_bias"], cfg.layer_norm_eps)
        keep = attention_mask[:, None, None, :].type_as(hidden)
        bias = (1.0 - keep) * MASKED_SCORE
        n, d = self.n_heads, self.head_dim
        for i in range(cfg.num_layers):
            w = self._layer(i)
            q, k, v = F.linear(hidden, w["qkv"], w["qkv_bias"]).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (n, d)).transpose(1, 2) for t in (q, k, v))
            scores = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5 + bias
            context = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).flatten(2)
            small = w["small"]
            out = (yield F.linear(context, w["o"])) + small["o_bias"]
            hidden = F.layer_norm(hidden + out, hidden.shape[-1:], small["attn_norm"],
                                  small["attn_norm_bias"], cfg.layer_norm_eps)
            up = F.gelu(F.linear(hidden, w["up"], w["up_bias"]))
            out = (yield F.linear(up, w["down"])) + small["down_bias"]
            hidden = F.layer_norm(hidden + out, hidden.shape[-1:], small["ffn_norm"],
                                  small["ffn_norm_bias"], cfg.layer_norm_eps)
        return hidden

    def _layer(self, i: int) -> dict[str, Any]:
        """Layer ``i``'s weights, fetched from the store once however many pieces ask."""
        if self._current is None or self._current[0] != i:
            w = self.store.layer(i)
            small = {k: w[k].clone() for k in _SMALL}
            self._current = (i, {**w, "small": small})
        return self._current[1]

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise InvalidInput(f"input_ids must be a LongTensor [N, L]; got dtype "
                               f"{input_ids.dtype} and shape {tuple(input_ids.shape)}")
        if attention_mask.shape != input_ids.shape:
            raise InvalidInput(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                               f"input_ids {tuple(input_ids.shape)}: they must match")
        if input_ids.shape[1] > self.config.max_positions:
            raise InvalidInput(f"{input_ids.shape[1]} tokens exceed the encoder's "
                               f"{self.config.max_positions} positions")
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= self.config.vocab_size):
            raise InvalidInput(f"token ids must lie in [0, {self.config.vocab_size})")
