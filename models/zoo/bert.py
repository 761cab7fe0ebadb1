"""A plain-torch BERT encoder: the architecture behind the zoo's sentence encoders.

Post-LayerNorm BERT with absolute positions and exact (erf) GELU, as in Hugging Face's
``BertModel``, built only from ``nn.Embedding``, ``nn.Linear`` and ``nn.LayerNorm``. Each
attention block is a :class:`SelfAttention` and each feed-forward block a
:class:`FeedForward`; both carry ``edgeswarm_kind`` so that the graph extractor treats one
block as one task.

``forward`` has no data-dependent Python control flow: the module traces with
``torch.fx.symbolic_trace`` and exports to ONNX with dynamic batch and sequence
dimensions. :func:`load_hf_weights` fills it from a Hugging Face ``BertModel`` state dict
(e.g. read from ``model.safetensors``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgeswarm.placement.errors import ModelFileError

#: Added to the attention scores of padding keys. The most negative float16 value: every
#: float dtype we run in can hold it, and exp() of it is exactly 0 in float32, so padding
#: gets no weight at all (the reference uses float32's minimum, with the same result).
MASKED_SCORE = float(torch.finfo(torch.float16).min)


@dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_hf(cls, config: Mapping[str, object], source: Path | str) -> BertConfig:
        """Read a Hugging Face ``config.json`` (already parsed), refusing what we don't build.

        ``source`` names the file in error messages.
        """
        required = {
            "model_type": ("bert", config.get("model_type", "bert")),
            "hidden_act": ("gelu", config.get("hidden_act", "gelu")),
            "position_embedding_type": ("absolute",
                                        config.get("position_embedding_type", "absolute")),
        }
        for key, (wanted, found) in required.items():
            if found != wanted:
                raise ModelFileError(
                    f"{source}: {key} is {found!r}, but edgeswarm's BERT encoder only builds "
                    f"{key}={wanted!r}; use a checkpoint of a standard BERT model")

        def number(key: str, default: float | None = None) -> float:
            value = config.get(key, default)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ModelFileError(
                    f"{source}: {key} is {value!r}, expected a number; the config file is "
                    "corrupt, reinstall the package that ships the model")
            return float(value)

        built = cls(
            vocab_size=int(number("vocab_size")),
            hidden_size=int(number("hidden_size")),
            num_layers=int(number("num_hidden_layers")),
            num_heads=int(number("num_attention_heads")),
            intermediate_size=int(number("intermediate_size")),
            max_positions=int(number("max_position_embeddings")),
            type_vocab_size=int(number("type_vocab_size", 2)),
            layer_norm_eps=number("layer_norm_eps", 1e-12),
        )
        if built.hidden_size % built.num_heads:
            raise ModelFileError(
                f"{source}: hidden_size {built.hidden_size} is not a multiple of "
                f"num_attention_heads {built.num_heads}; the config file is corrupt")
        return built


class Embeddings(nn.Module):
    """Token + absolute position + token-type-0 embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Single-segment input: every token has token type 0.
        hidden = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(hidden)


class SelfAttention(nn.Module):
    """Multi-head self-attention, output projection, residual and LayerNorm."""

    edgeswarm_kind = "attention"

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = size // config.num_heads
        self.query = nn.Linear(size, size)
        self.key = nn.Linear(size, size)
        self.value = nn.Linear(size, size)
        self.output = nn.Linear(size, size)
        self.norm = nn.LayerNorm(size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``hidden``: [N, L, H]; ``bias``: [N, 1, 1, L], 0 for tokens, very negative for pads."""
        q = self._heads(self.query(hidden))
        k = self._heads(self.key(hidden))
        v = self._heads(self.value(hidden))
        # Explicit matmul-softmax: exports to plain MatMul/Softmax ONNX nodes that every
        # runtime and quantizer knows, unlike a fused attention op.
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5 + bias
        context = torch.matmul(scores.softmax(dim=-1), v)
        context = context.transpose(1, 2).flatten(2)  # [N, L, H]
        return self.norm(hidden + self.output(context))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, H] -> [N, heads, L, head_dim]."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)


class FeedForward(nn.Module):
    """Linear up, GELU, linear down, residual and LayerNorm."""

    edgeswarm_kind = "mlp"

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU()
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden + self.down(self.act(self.up(hidden))))


class EncoderLayer(nn.Module):
    """One transformer layer: attention, then feed-forward."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attention = SelfAttention(config)
        self.feed_forward = FeedForward(config)

    def forward(self, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.attention(hidden, bias))


class BertEncoder(nn.Module):
    """Token ids and attention mask ([N, L] each) to hidden states [N, L, H]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.embeddings(input_ids)
        keep = attention_mask[:, None, None, :].type_as(hidden)
        bias = (1.0 - keep) * MASKED_SCORE
        for layer in self.layers:
            hidden = layer(hidden, bias)
        return hidden


# Hugging Face BertModel key -> ours. Keys matching _HF_IGNORED are dropped: the position
# ids buffer (we compute positions) and the pooler (sentence encoders do not use it).
_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^embeddings\.word_embeddings\.", "embeddings.word."),
    (r"^embeddings\.position_embeddings\.", "embeddings.position."),
    (r"^embeddings\.token_type_embeddings\.", "embeddings.token_type."),
    (r"^embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.attention.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.output."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention.norm."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.feed_forward.up."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.feed_forward.down."),
    (r"^encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.feed_forward.norm."),
)
_HF_IGNORED = re.compile(r"^(embeddings\.position_ids$|pooler\.)")


def load_hf_weights(encoder: BertEncoder, tensors: Mapping[str, torch.Tensor],
                    source: Path | str) -> None:
    """Copy a Hugging Face ``BertModel`` state dict into ``encoder``, every weight exactly once.

    ``source`` names the file in error messages. Raises :class:`ModelFileError` when a
    weight is missing, unknown or of the wrong shape.
    """
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        if _HF_IGNORED.match(key):
            continue
        for pattern, replacement in _HF_RENAMES:
            new_key, hits = re.subn(pattern, replacement, key)
            if hits:
                renamed[new_key] = tensor
                break
        else:
            unknown.append(key)
    expected = set(encoder.state_dict())
    missing = sorted(expected - renamed.keys())
    unknown += sorted(renamed.keys() - expected)
    if missing or unknown:
        raise ModelFileError(
            f"{source}: weights do not fit a {encoder.config.num_layers}-layer BERT encoder "
            f"(missing: {missing[:5]}, unexpected: {unknown[:5]}); the file is not a BertModel "
            "checkpoint matching its config.json, reinstall the package that ships it")
    try:
        encoder.load_state_dict(renamed, strict=True)
    except RuntimeError as exc:  # shape mismatch
        raise ModelFileError(
            f"{source}: weight shapes do not match its config.json ({exc}); "
            "reinstall the package that ships the model") from exc
