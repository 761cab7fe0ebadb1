"""A plain-torch Llama decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Two ways to run the same weights:

- ``LlamaForCausalLM.forward(input_ids) -> logits`` recomputes the whole sequence. It has
  no cache and no data-dependent control flow, so ``torch.fx.symbolic_trace`` and
  ``torch.export`` (hence ``torch.onnx.export(dynamo=True)``) trace it with dynamic
  batch and sequence dimensions.
- ``prefill(input_ids) -> (logits, cache)`` then ``decode(token, cache) -> (logits, cache)``
  run incrementally over a :class:`KVCache`, which is immutable: each call returns a new one.

Attention, MLP and norm blocks are separate modules tagged with ``edgeswarm_kind``; a graph
extractor treats each tagged module as one task. Each attention block computes its own
rotary tables, so its only input is the hidden state.

Weights use the Hugging Face layout (rotate-half RoPE); ``gguf_weights`` converts GGUF files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from edgeswarm.placement.errors import InvalidInput

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
]


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-5
    context_length: int = 2048
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise InvalidInput(f"hidden_size {self.hidden_size} is not a multiple of "
                               f"num_heads {self.num_heads}; fix the model's hyper-parameters")
        if self.num_heads % self.num_kv_heads:
            raise InvalidInput(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                               f"{self.num_kv_heads}; fix the model's hyper-parameters")
        if self.head_dim % 2:
            raise InvalidInput(f"head_dim {self.head_dim} is odd; rotary embeddings need an "
                               "even head dimension")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer so far, each ``[batch, kv_heads, tokens, head_dim]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @classmethod
    def empty(cls, config: LlamaConfig, batch: int, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu") -> KVCache:
        blank = torch.zeros(batch, config.num_kv_heads, 0, config.head_dim, dtype=dtype,
                            device=device)
        layers = (blank,) * config.num_layers
        return cls(keys=layers, values=layers)

    @property
    def length(self) -> int:
        """Number of tokens already in the cache."""
        return int(self.keys[0].shape[2]) if self.keys else 0


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    edgeswarm_kind = "norm"

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x * scale * self.weight


class MLP(nn.Module):
    """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``."""

    edgeswarm_kind = "mlp"

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary position embeddings."""

    edgeswarm_kind = "attention"
    inv_freq: torch.Tensor

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.rope_theta = config.rope_theta
        self.register_buffer("inv_freq", self.rope_frequencies(), persistent=False)

    def rope_frequencies(self) -> torch.Tensor:
        """Rotation speed of each pair of dimensions: ``theta ** (-2i / head_dim)``."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.rope_theta ** exponents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` ``[batch, tokens, hidden]`` alone, positions starting at 0."""
        positions = torch.arange(x.shape[1], device=x.device)
        q, k, v = self._project(x, positions)
        y = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v),
                                           is_causal=True)
        return self._merge(y, x)

    def forward_cached(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend over the cached tokens and ``x``; returns the output and the grown cache."""
        past = past_k.shape[2]
        new = x.shape[1]
        positions = torch.arange(past, past + new, device=x.device)
        q, k, v = self._project(x, positions)
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        # Query i sits at position past + i and sees keys 0 .. past + i.
        mask = torch.ones(new, past + new, dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, self._repeat_kv(k), self._repeat_kv(v),
                                           attn_mask=mask)
        return self._merge(y, x), k, v

    def _project(self, x: torch.Tensor, positions: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, tokens = x.shape[0], x.shape[1]
        q = self.q_proj(x).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, tokens, self.num_kv_heads, self.head_dim).transpose(1, 2)
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def _repeat_kv(self, kv: torch.Tensor) -> torch.Tensor:
        """Share each key/value head with its group of query heads."""
        group = self.num_heads // self.num_kv_heads
        if group == 1:
            return kv
        batch, tokens = kv.shape[0], kv.shape[2]
        expanded = kv[:, :, None].expand(batch, self.num_kv_heads, group, tokens, self.head_dim)
        return expanded.reshape(batch, self.num_heads, tokens, self.head_dim)

    def _merge(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        merged = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.num_heads * self.head_dim)
        return self.o_proj(merged)


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention, then MLP."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))

    def forward_cached(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, k, v = self.attn.forward_cached(self.attn_norm(x), past_k, past_v)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), k, v


class LlamaForCausalLM(nn.Module):
    """Llama decoder with a language-model head; tied to the embeddings when configured."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def from_weights(cls, config: LlamaConfig, state_dict: Mapping[str, torch.Tensor]
                     ) -> LlamaForCausalLM:
        """A model in eval mode that uses ``state_dict``'s tensors as its parameters.

        Skips random initialization (seconds for 100M+ parameters); ``lm_head.weight`` may
        be absent when the embeddings are tied. Missing or extra names raise InvalidInput.
        """
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
        if config.tie_embeddings:
            missing = [name for name in missing if name != "lm_head.weight"]
            model.lm_head.weight = model.embed_tokens.weight
        if missing or unexpected:
            raise InvalidInput(f"weights missing {sorted(missing)} or unexpected "
                               f"{sorted(unexpected)} for a {config.num_layers}-layer llama "
                               "model; the weight file does not match the config")
        for module in model.modules():
            if isinstance(module, Attention):
                module.inv_freq = module.rope_frequencies()
        return model.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, tokens, vocab]`` for ``input_ids`` ``[batch, tokens]``, no cache."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """Run the prompt ``[batch, tokens]``; returns its logits and a cache holding it."""
        self._check_ids(input_ids)
        empty = KVCache.empty(self.config, int(input_ids.shape[0]),
                              dtype=self.embed_tokens.weight.dtype,
                              device=self.embed_tokens.weight.device)
        return self.extend(input_ids, empty)

    def decode(self, token: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One step: ``token`` ``[batch]`` after ``cache``; returns logits ``[batch, vocab]``."""
        if token.dim() != 1:
            raise InvalidInput(f"decode takes one token per sequence, shape [batch]; got "
                               f"shape {tuple(token.shape)}. Use extend() for several tokens")
        logits, cache = self.extend(token[:, None], cache)
        return logits[:, -1], cache

    def extend(self, input_ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Append ``input_ids`` ``[batch, tokens]`` to ``cache``; logits for the new tokens."""
        self._check_ids(input_ids)
        if len(cache.keys) != len(self.layers):
            raise InvalidInput(f"the cache has {len(cache.keys)} layers, the model "
                               f"{len(self.layers)}; start it with prefill()")
        total = cache.length + int(input_ids.shape[1])
        if total > self.config.context_length:
            raise InvalidInput(f"{total} tokens exceed the context length "
                               f"{self.config.context_length}; shorten the prompt or output")
        x = self.embed_tokens(input_ids)
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer, past_k, past_v in zip(self.layers, cache.keys, cache.values, strict=True):
            x, k, v = cast(DecoderLayer, layer).forward_cached(x, past_k, past_v)
            keys.append(k)
            values.append(v)
        return self.lm_head(self.norm(x)), KVCache(tuple(keys), tuple(values))

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
                 stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy decoding of one sequence; returns the new token ids (a stop id ends it
        and is included)."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] == 0:
            raise InvalidInput("generate needs at least one prompt token")
        if max_new_tokens < 0:
            raise InvalidInput(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        max_new_tokens = min(max_new_tokens, self.config.context_length - int(ids.shape[1]))
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits, cache = self.prefill(ids)
        token = logits[:, -1].argmax(dim=-1)
        stops = set(stop_ids)
        while True:
            out.append(int(token))
            if out[-1] in stops or len(out) >= max_new_tokens:
                return out
            next_logits, cache = self.decode(token, cache)
            token = next_logits.argmax(dim=-1)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        check_token_ids(input_ids, self.config.vocab_size)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """InvalidInput unless ``input_ids`` is a LongTensor [batch, tokens] of ids in the
    vocabulary."""
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise InvalidInput(f"input_ids must be a LongTensor [batch, tokens]; got dtype "
                           f"{input_ids.dtype} and shape {tuple(input_ids.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise InvalidInput(f"token ids must lie in [0, {vocab_size}); fix the tokenizer or "
                           "the prompt")
