"""Read a llama-architecture GGUF file into float32 weights, a config and a tokenizer.

GGUF (llama.cpp's format) stores quantized blocks (Q4_1, Q8_0, Q6_K, ...) that
``gguf.quants.dequantize`` expands to float32. Two conversions give the Hugging Face
layout that :mod:`edgeswarm.models.zoo.llama` expects:

- llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` so that each head's
  rotary pairs are interleaved (GPT-J style); our attention rotates halves (GPT-NeoX /
  Hugging Face style), so :func:`unpermute_qk` applies the inverse permutation.
- Tensor names map from ``blk.N.attn_q.weight`` to ``layers.N.attn.q_proj.weight``.

The tokenizer is rebuilt from ``tokenizer.ggml.*`` metadata as a byte-level BPE
``tokenizers.Tokenizer``. Dequantizing a 135M-parameter model takes about a second, so
nothing is cached on disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from edgeswarm.models.zoo.llama import LlamaConfig, LlamaForCausalLM
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField, ReaderTensor
    from tokenizers import Tokenizer

log = logging.getLogger("edgeswarm.models.zoo")

__all__ = ["LlamaGGUF", "read_llama_gguf", "unpermute_qk"]

# GGUF tensor name (inside ``blk.N.``) -> LlamaForCausalLM name (inside ``layers.N.``).
_LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}

# llama.cpp pre-tokenizers that split digits one by one before the GPT-2 regex.
_DIGIT_SPLITTING_PRE = frozenset({"smollm", "starcoder", "refact", "command-r"})

_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values of tokens never split by BPE


@dataclass(frozen=True)
class LlamaGGUF:
    """What a llama GGUF file holds, converted: config, float32 weights, tokenizer."""

    path: Path
    name: str
    config: LlamaConfig
    #: Float32 weights named as in LlamaForCausalLM (``lm_head`` absent when tied).
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None

    def build(self) -> LlamaForCausalLM:
        """A LlamaForCausalLM in eval mode holding these weights (not copied)."""
        try:
            return LlamaForCausalLM.from_weights(self.config, self.state_dict)
        except (InvalidInput, RuntimeError) as exc:  # RuntimeError: a shape mismatch
            raise ModelFileError(f"{self.path} does not hold a consistent llama model: "
                                 f"{exc}") from exc


def read_llama_gguf(path: Path | str) -> LlamaGGUF:
    """Read and dequantize the llama-architecture GGUF file at ``path``."""
    path = Path(path)
    reader = _open(path)
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ModelFileError(f"{path} holds a {arch!r} model; only the 'llama' architecture "
                             "is supported. Use a Llama-family GGUF file")
    names = {t.name for t in reader.tensors}
    config = _llama_config(path, meta, tie_embeddings="output.weight" not in names)
    tokenizer = _tokenizer(path, meta)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        weight = _dequantize(path, tensor)
        gguf_name = tensor.name
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_heads if "attn_q" in gguf_name else config.num_kv_heads
            weight = unpermute_qk(weight, heads)
        state[_our_name(path, gguf_name)] = weight
    return LlamaGGUF(path=path, name=str(meta.get("general.name", path.stem)), config=config,
                     state_dict=state, tokenizer=tokenizer,
                     bos_id=_optional_int(meta.get("tokenizer.ggml.bos_token_id")),
                     eos_id=_optional_int(meta.get("tokenizer.ggml.eos_token_id")),
                     chat_template=meta.get("tokenizer.chat_template"))


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of a query/key projection ``[heads * head_dim, in]``.

    The converter reorders each head's rows from halves ``(2, head_dim / 2)`` to interleaved
    pairs ``(head_dim / 2, 2)``; this reorders them back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape).contiguous()


def _open(path: Path) -> GGUFReader:
    try:
        import gguf
    except ImportError as exc:
        raise RuntimeNotAvailable("reading GGUF files needs the gguf package; install it with: "
                                  "pip install gguf") from exc
    if not path.is_file():
        raise ModelFileError(f"GGUF file {path} does not exist; check the path")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors ...
        raise ModelFileError(f"{path} is not a readable GGUF file ({exc}); it is corrupt or "
                             "of another format. Download or convert it again") from exc


def _field_value(field: ReaderField) -> Any:
    """A GGUF metadata field as a Python value (str, int, float, bool or list)."""
    import gguf

    def one(part: np.ndarray, kind: Any) -> Any:
        if kind == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    kind = field.types[0] if field.types else None
    if kind == gguf.GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], kind)


def _llama_config(path: Path, meta: dict[str, Any], tie_embeddings: bool) -> LlamaConfig:
    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise ModelFileError(f"{path} lacks the metadata key llama.{key}; the file is "
                                 "incomplete. Convert it again with llama.cpp")
        return meta[f"llama.{key}"]

    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise ModelFileError(f"{path} uses rope scaling {scaling!r}, which is not supported; "
                             "use a model without rope scaling")
    heads = int(need("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens", [])
    config = LlamaConfig(
        vocab_size=int(meta.get("llama.vocab_size", len(tokens))),
        hidden_size=int(need("embedding_length")),
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", heads)),
        rope_theta=float(meta.get("llama.rope.freq_base", 10_000.0)),
        rms_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(meta.get("llama.context_length", 2048)),
        tie_embeddings=tie_embeddings,
    )
    rope_dims = int(meta.get("llama.rope.dimension_count", config.head_dim))
    if rope_dims != config.head_dim:
        raise ModelFileError(f"{path} rotates {rope_dims} of {config.head_dim} head "
                             "dimensions; partial rotary embeddings are not supported")
    return config


def _dequantize(path: Path, tensor: ReaderTensor) -> torch.Tensor:
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
    try:
        # A plain ndarray view: slicing a np.memmap row group by row group is twice as slow.
        values = dequantize(tensor.data.view(np.ndarray), tensor.tensor_type)
        values = np.require(values, dtype=np.float32, requirements=["C", "W"]).reshape(shape)
    except (NotImplementedError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot dequantize tensor {tensor.name} of type "
                             f"{tensor.tensor_type.name} ({exc}); re-quantize the model to "
                             "a type gguf supports (Q4_0, Q4_1, Q8_0, K-quants, F16)") from exc
    return torch.from_numpy(values)


def _our_name(path: Path, gguf_name: str) -> str:
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if len(parts) == 1 and parts[0] in _TOP_TENSORS:
        return f"{_TOP_TENSORS[parts[0]]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{suffix}"
    raise ModelFileError(f"{path} has tensor {gguf_name!r}, which a plain llama model does "
                         "not use; this variant is not supported")


def _tokenizer(path: Path, meta: dict[str, Any]) -> Tokenizer:
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as exc:
        raise RuntimeNotAvailable("building the tokenizer needs the tokenizers package; "
                                  "install it with: pip install tokenizers") from exc
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelFileError(f"{path} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') "
                             "is supported")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens", [])
    if not tokens:
        raise ModelFileError(f"{path} has no tokenizer.ggml.tokens; the file is incomplete. "
                             "Convert it again with llama.cpp")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelFileError(f"{path}: the tokenizer vocabulary has duplicate tokens; the "
                             "file is corrupt")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLITTING_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, t in enumerate(types) if t == _CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], normalized=False)
                          for i, t in enumerate(types) if t == _USER_DEFINED])
    if meta.get("tokenizer.ggml.add_bos_token") and "tokenizer.ggml.bos_token_id" in meta:
        from tokenizers.processors import TemplateProcessing

        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tokenizer.post_processor = TemplateProcessing(
            single=f"{tokens[bos_id]} $A", pair=f"{tokens[bos_id]} $A $B",
            special_tokens=[(tokens[bos_id], bos_id)])
    log.debug("built a %d-token BPE tokenizer from %s", len(tokens), path)
    return tokenizer


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
