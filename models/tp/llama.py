"""One member of a tensor-parallel group running a Llama decoder (SmolLM2), Megatron-style.

Each member holds a slice of every layer (:mod:`.split`) and the whole hidden state:

- attention: column-parallel by heads (its query heads' rows of ``q_proj`` and the rows of
  ``k_proj``/``v_proj`` for the kv heads they read, fused into one ``qkv`` matrix), then
  row-parallel ``o_proj`` (its heads' columns): a partial sum, one all-reduce;
- MLP: ``gate``/``up`` column-parallel (fused), ``down`` row-parallel, one all-reduce;
- the tied embedding / LM head is vocabulary-parallel: a member holds its vocabulary rows,
  looks up the tokens it owns (zeros for the rest; the prompt's embedding is one
  all-reduce) and computes the logits of its rows only.

The KV cache of the member's kv heads stays on the member across tokens (preallocated,
grown by doubling). Greedy decoding never gathers logits: each member proposes its best
token, its score and *its embedding row*, and one small gather (``[members, batch,
hidden + 2]``) gives every member the winner and the next step's input at once, so a
token costs 2 all-reduces per layer + 1. The full logits are gathered only by
:meth:`LlamaMember.prefill` / :meth:`LlamaMember.decode`, which mirror
``LlamaForCausalLM`` for the correctness checks.

Functional torch over the tensors a :class:`~edgeswarm.models.tp.store.LayerStore` hands
out, one layer at a time in order, so a sliding-window store can feed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import torch
import torch.nn.functional as F

from edgeswarm.models.tp.collective import Collective, Program, drive, gather_last, gather_stack
from edgeswarm.models.tp.split import LayerShape, MemberSlice, Split
from edgeswarm.models.zoo.llama import (
    DecoderLayer,
    LlamaConfig,
    LlamaForCausalLM,
    check_token_ids,
)
from edgeswarm.placement.errors import InvalidInput, ModelFileError

if TYPE_CHECKING:
    from edgeswarm.models.tp.store import LayerStore

__all__ = ["KIND", "Generation", "LlamaMember", "MemberShard", "llama_shape", "slice_llama"]

KIND = "llama"
Tensors = dict[str, torch.Tensor]


class MemberShard(NamedTuple):
    """One member's weights as ``store.write_shard`` takes them."""

    layers: list[Tensors]
    extra: Tensors
    meta: dict[str, Any]


def llama_shape(config: LlamaConfig) -> LayerShape:
    return LayerShape(hidden=config.hidden_size, num_heads=config.num_heads,
                      num_kv_heads=config.num_kv_heads, intermediate=config.intermediate_size,
                      vocab=config.vocab_size, mlp_matrices=3)


def slice_llama(model: LlamaForCausalLM, split: Split) -> list[MemberShard]:
    """Each member's slice of ``model`` (contiguous copies: a member's files hold only it)."""
    cfg = model.config
    if split.shape != llama_shape(cfg):
        raise InvalidInput(f"the split was made for {split.shape}, the model is "
                           f"{llama_shape(cfg)}")
    d = cfg.head_dim
    out = []
    for rank, m in enumerate(split.members):
        (q0, q1), (k0, k1), (c0, c1), (v0, v1) = m.q_heads, m.kv_heads, m.mlp, m.vocab
        layers: list[Tensors] = []
        for block in model.layers:
            layer = cast(DecoderLayer, block)
            attn, mlp = layer.attn, layer.mlp
            layers.append({
                "attn_norm": layer.attn_norm.weight.detach().clone(),
                "qkv": torch.cat((attn.q_proj.weight[q0 * d:q1 * d],
                                  attn.k_proj.weight[k0 * d:k1 * d],
                                  attn.v_proj.weight[k0 * d:k1 * d])).detach().contiguous(),
                "o": attn.o_proj.weight[:, q0 * d:q1 * d].detach().contiguous(),
                "mlp_norm": layer.mlp_norm.weight.detach().clone(),
                "gate_up": torch.cat((mlp.gate_proj.weight[c0:c1],
                                      mlp.up_proj.weight[c0:c1])).detach().contiguous(),
                "down": mlp.down_proj.weight[:, c0:c1].detach().contiguous(),
            })
        extra = {"embed": model.embed_tokens.weight[v0:v1].detach().clone(),
                 "norm": model.norm.weight.detach().clone()}
        if not cfg.tie_embeddings:
            extra["lm_head"] = model.lm_head.weight[v0:v1].detach().clone()
        meta = {"kind": KIND, "config": asdict(cfg), "rank": rank, "size": split.size,
                "slice": m.to_json(), "vocab_ranges": [list(x.vocab) for x in split.members]}
        out.append(MemberShard(layers, extra, meta))
    return out


@dataclass(frozen=True)
class Generation:
    """Greedy tokens of one sequence batch and how long they took."""

    tokens: torch.Tensor          # [batch, new_tokens]
    ttft_s: float                 # prompt in -> first new token known on this member
    step_s: tuple[float, ...]     # each further token
    #: All-reduces (count, seconds) until the first token, and in the steps after it.
    prefill_collectives: tuple[int, float] = (0, 0.0)
    decode_collectives: tuple[int, float] = (0, 0.0)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaMember:
    """The member program: ``store`` holds this member's slice (``slice_llama``),
    ``coll`` joins it to the others."""

    def __init__(self, store: LayerStore, coll: Collective) -> None:
        meta = store.meta
        if meta.get("kind") != KIND:
            raise ModelFileError(f"the shard holds a {meta.get('kind')!r} model, not {KIND!r}")
        try:
            self.config = LlamaConfig(**meta["config"])
            self.slice = MemberSlice.from_json(meta["slice"])
            self.vocab_ranges = [(int(a), int(b)) for a, b in meta["vocab_ranges"]]
            rank, size = int(meta["rank"]), int(meta["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"the shard's meta.json is not a llama member's ({exc!r})"
                                 ) from None
        if (rank, size) != (coll.rank, coll.size):
            raise InvalidInput(f"the shard is member {rank} of {size}, the collective is "
                               f"member {coll.rank} of {coll.size}")
        if store.num_layers != self.config.num_layers:
            raise ModelFileError(f"the shard has {store.num_layers} layers, its config "
                                 f"{self.config.num_layers}")
        self.store = store
        self.coll = coll
        cfg = self.config
        self.head_dim = d = cfg.head_dim
        (q0, q1), (k0, k1) = self.slice.q_heads, self.slice.kv_heads
        self.n_q, self.n_kv = q1 - q0, k1 - k0
        group = cfg.num_heads // cfg.num_kv_heads
        # Runs of local query heads reading one local kv head: (kv, first q, last q + 1).
        self._runs = [(j - k0, max(q0, j * group) - q0, min(q1, (j + 1) * group) - q0)
                      for j in range(k0, k1)]
        self._uniform = len({b - a for _, a, b in self._runs}) == 1
        exponents = torch.arange(0, d, 2, dtype=torch.float32) / d
        self._inv_freq = 1.0 / (cfg.rope_theta ** exponents)
        extra = store.extra()
        self._embed = extra["embed"]
        self._norm = extra["norm"]
        self._head = extra.get("lm_head", self._embed)
        self._v0 = self.slice.vocab[0]
        self._current: tuple[int, Mapping[str, torch.Tensor]] | None = None
        self.reset()

    # -- the cache ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the sequence (drop the KV cache)."""
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self.length = 0

    def _reserve(self, batch: int, total: int, dtype: torch.dtype) -> None:
        if self._keys and self._keys[0].shape[0] != batch:
            raise InvalidInput(f"the cache holds a batch of {self._keys[0].shape[0]}, got "
                               f"{batch}; reset() before a new batch")
        capacity = self._keys[0].shape[2] if self._keys else 0
        if total <= capacity:
            return
        grown = max(total, 2 * capacity, 64)
        shape = (batch, self.n_kv, grown, self.head_dim)
        for cache in (self._keys, self._values):
            for i in range(self.config.num_layers):
                buf = torch.zeros(shape, dtype=dtype)
                if i < len(cache):
                    buf[:, :, :self.length] = cache[i][:, :, :self.length]
                    cache[i] = buf
                else:
                    cache.append(buf)

    # -- the model, in pieces ----------------------------------------------------------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[batch, tokens, hidden]`` of ``input_ids``: each member looks up
        the tokens it owns, one all-reduce joins them (adding zeros is exact)."""
        self._check_ids(input_ids)
        local = input_ids - self._v0
        mine = (local >= 0) & (local < self._embed.shape[0])
        x = self._embed[local.clamp(0, self._embed.shape[0] - 1)] * mine[..., None]
        return self.coll.all_reduce(x) if self.coll.size > 1 else x

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        """Every layer over ``x`` (the tokens after the cache), growing the cache.

        ``chunks > 1`` cuts the tokens into that many pieces that take turns layer by layer
        (a piece's all-reduce overlaps the next piece's work); a later piece attends to the
        earlier ones through the cache, which they filled at that layer just before.
        """
        batch, new = int(x.shape[0]), int(x.shape[1])
        past = self.length
        if past + new > self.config.context_length:
            raise InvalidInput(f"{past + new} tokens exceed the context length "
                               f"{self.config.context_length}; shorten the prompt or output")
        if chunks < 1:
            raise InvalidInput(f"chunks must be >= 1, got {chunks}")
        self._reserve(batch, past + new, x.dtype)
        pieces = [p for p in torch.arange(new).tensor_split(chunks) if len(p)]
        programs = [self._program(x[:, int(p[0]):int(p[-1]) + 1], past + int(p[0]))
                    for p in pieces]
        out = drive(self.coll, programs)
        self.length = past + new
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def _program(self, x: torch.Tensor, start: int) -> Program:
        """Tokens at positions ``start ...`` through every layer, as a generator of the
        partial sums to all-reduce (one per sub-block)."""
        new = int(x.shape[1])
        positions = torch.arange(start, start + new, dtype=torch.float32)
        angles = positions[:, None] * self._inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        # Query i sits at position start + i and sees keys 0 .. start + i.
        mask = (None if new == 1 else
                torch.ones(new, start + new, dtype=torch.bool).tril(start))
        eps = self.config.rms_eps
        for i in range(self.config.num_layers):
            w = self._layer(i)
            x = x + (yield self._attention(i, _rms(x, w["attn_norm"], eps), w, cos, sin, mask,
                                           start))
            x = x + (yield self._mlp(_rms(x, w["mlp_norm"], eps), w))
        return x

    def _layer(self, i: int) -> Mapping[str, torch.Tensor]:
        """Layer ``i``'s weights, fetched from the store once however many pieces ask (the
        pieces move through the layers together, so none holds an evicted slot)."""
        if self._current is None or self._current[0] != i:
            self._current = (i, self.store.layer(i))
        return self._current[1]

    def local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of this member's vocabulary rows for hidden states ``x``."""
        return F.linear(_rms(x, self._norm, self.config.rms_eps), self._head)

    def next_token(self, x_last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy choice for hidden states ``[batch, hidden]``: ``(tokens [batch], their
        embeddings [batch, 1, hidden])``, from one gather of each member's best candidate.
        Ties go to the lowest token id, as ``argmax`` over the full logits does."""
        logits = self.local_logits(x_last)
        best = logits.argmax(dim=-1)
        score = logits.gather(-1, best[:, None])
        if self.coll.size == 1:
            return best, self._embed[best][:, None]
        ids = (best + self._v0).to(logits.dtype)[:, None]   # exact below 2**24
        mine = torch.cat((score, ids, self._embed[best]), dim=-1)
        every = gather_stack(self.coll, mine)             # [members, batch, hidden + 2]
        scores = every[:, :, 0]
        winner = (scores == scores.max(dim=0).values).to(torch.int8).argmax(dim=0)
        picked = every[winner, torch.arange(every.shape[1])]
        return picked[:, 1].to(torch.long), picked[:, None, 2:]

    # -- LlamaForCausalLM's interface, with full logits --------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, gather: bool = True, chunks: int = 1
                ) -> torch.Tensor:
        """The prompt's logits ``[batch, tokens, vocab]``, the cache filled with it.
        ``gather=False``: only this member's vocabulary columns (no gather)."""
        self.reset()
        return self._logits(self.forward(self.embed(input_ids), chunks), gather)

    @torch.inference_mode()
    def decode(self, token: torch.Tensor, gather: bool = True) -> torch.Tensor:
        """One step after the cache: logits ``[batch, vocab]`` (or this member's columns)."""
        if token.dim() != 1:
            raise InvalidInput(f"decode takes one token per sequence, shape [batch]; got "
                               f"shape {tuple(token.shape)}")
        return self._logits(self.forward(self.embed(token[:, None])), gather)[:, -1]

    def _logits(self, x: torch.Tensor, gather: bool) -> torch.Tensor:
        local = self.local_logits(x)
        if self.coll.size == 1 or not gather:
            return local
        return gather_last(self.coll, local, self.vocab_ranges, self.config.vocab_size)

    # -- greedy generation -------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, new_tokens: int, prefill_chunks: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> Generation:
        """Greedy decoding of ``new_tokens`` after the prompt ``[batch, tokens]``, timed;
        the prompt in ``prefill_chunks`` pieces that take turns (see :meth:`forward`)."""
        if new_tokens < 1:
            raise InvalidInput(f"new_tokens must be >= 1, got {new_tokens}")
        self.reset()
        stats = self.coll.stats
        c0, s0 = stats.calls, stats.seconds
        start = clock()
        x = self.forward(self.embed(input_ids), prefill_chunks)
        token, x = self.next_token(x[:, -1])
        ttft = clock() - start
        c1, s1 = stats.calls, stats.seconds
        tokens = [token]
        steps = []
        for _ in range(new_tokens - 1):
            t0 = clock()
            x = self.forward(x)
            token, x = self.next_token(x[:, -1])
            steps.append(clock() - t0)
            tokens.append(token)
        return Generation(torch.stack(tokens, dim=1), ttft, tuple(steps),
                          (c1 - c0, s1 - s0), (stats.calls - c1, stats.seconds - s1))

    # -- the sub-blocks ----------------------------------------------------------------

    def _attention(self, i: int, h: torch.Tensor, w: Mapping[str, torch.Tensor],
                   cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                   start: int) -> torch.Tensor:
        """This member's heads over ``h`` (tokens from ``start``): the partial output."""
        batch, new = int(h.shape[0]), int(h.shape[1])
        d, nq, nkv = self.head_dim, self.n_q, self.n_kv
        qkv = F.linear(h, w["qkv"])
        q = qkv[..., :nq * d].view(batch, new, nq, d).transpose(1, 2)
        k = qkv[..., nq * d:(nq + nkv) * d].view(batch, new, nkv, d).transpose(1, 2)
        v = qkv[..., (nq + nkv) * d:].view(batch, new, nkv, d).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        end = start + new
        self._keys[i][:, :, start:end] = k
        self._values[i][:, :, start:end] = v
        keys, values = self._keys[i][:, :, :end], self._values[i][:, :, :end]
        # A kv head's query heads attend as one block of (heads x tokens) queries: no copy
        # of the cache per query head.
        if self._uniform:
            n = self._runs[0][2] - self._runs[0][1]
            y = F.scaled_dot_product_attention(
                q.reshape(batch, nkv, n * new, d), keys, values,
                attn_mask=None if mask is None else mask.repeat(n, 1))
            y = y.view(batch, nq, new, d)
        else:
            parts = []
            for j, a, b in self._runs:
                n = b - a
                part = F.scaled_dot_product_attention(
                    q[:, a:b].reshape(batch, 1, n * new, d), keys[:, j:j + 1],
                    values[:, j:j + 1], attn_mask=None if mask is None else mask.repeat(n, 1))
                parts.append(part.view(batch, n, new, d))
            y = torch.cat(parts, dim=1)
        merged = y.transpose(1, 2).reshape(batch, new, nq * d)
        return F.linear(merged, w["o"])

    def _mlp(self, h: torch.Tensor, w: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This member's MLP columns over ``h``: the partial output."""
        gate, up = F.linear(h, w["gate_up"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w["down"])

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        check_token_ids(input_ids, self.config.vocab_size)


def reference_generation(model: LlamaForCausalLM, input_ids: torch.Tensor, new_tokens: int,
                         steps: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The one-device model's answer: prefill logits, the logits of the first ``steps``
    decode steps of greedy decoding, and the ``new_tokens`` greedy tokens."""
    with torch.inference_mode():
        logits, cache = model.prefill(input_ids)
        token = logits[:, -1].argmax(dim=-1)
        tokens, decoded = [token], []
        for s in range(new_tokens - 1):
            step, cache = model.decode(token, cache)
            if s < steps:
                decoded.append(step)
            token = step.argmax(dim=-1)
            tokens.append(token)
    return logits, decoded, torch.stack(tokens, dim=1)


def member_checks(member: LlamaMember, input_ids: torch.Tensor, tokens: torch.Tensor,
                  steps: int, gather: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of the prompt and of ``steps`` decode steps fed ``tokens`` (the reference's
    greedy tokens, so both sides see the same inputs): full, or this member's columns."""
    prefill = member.prefill(input_ids, gather)
    decoded = [member.decode(tokens[:, s], gather) for s in range(min(steps, tokens.shape[1]))]
    return prefill, decoded


def shard_sizes(shards: Sequence[MemberShard]) -> list[int]:
    """Parameter bytes of each member's shard."""
    return [sum(t.nbytes for layer in s.layers for t in layer.values())
            + sum(t.nbytes for t in s.extra.values()) for s in shards]
