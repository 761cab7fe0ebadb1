"""The learned codec: a bottleneck encoder, a quantized latent entropy-coded with
CompressAI's factorized prior, and a decoder on the receiver.

Like Entropic Student (Matsubara et al., 2022), the sender maps the activation at the cut
to a small latent (a stride-2 convolution, ReLU, a 1x1 convolution to
``latent_channels``), CompressAI's :class:`EntropyBottleneck` rounds it and codes it with
its learned per-channel density (rANS, ``compressai.ans``), and the receiver decodes the
symbols and maps them back to an activation of the original shape (1x1 convolution, ReLU,
a stride-2 transposed convolution), which the rest of the model — fine-tuned for it in
training, see :mod:`~edgeswarm.models.codecs.train` — takes as its input.

A trained codec is an *artifact*: ``<stem>.safetensors`` holding the encoder, entropy
model (including its integer CDF tables, so both ends code with identical tables),
decoder and the fine-tuned tail, and ``<stem>.json`` describing it with the weights'
sha256. Nothing is pickled. The same two files are what a deployment ships to the sender
and the receiver of its cut (:func:`load_files` reads them under any names). Payload
(after the header of :mod:`~edgeswarm.models.codecs.wire`): two bytes of the artifact's
sha256 (bytes made by another artifact are refused), the batch size, the latent's height
and width, then per sample the length and the bytes of its entropy-coded latent.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from edgeswarm.models.codecs import _compressai, wire
from edgeswarm.models.codecs.base import Codec, CodecProfile, as_batch
from edgeswarm.placement.codecs import CodecSpec
from edgeswarm.placement.errors import InvalidInput, ModelFileError

FORMAT = "edgeswarm.codec.learned/1"
#: Entropy-model buffers whose size is only known once the model is updated.
_CDF_BUFFERS = ("_offset", "_quantized_cdf", "_cdf_length")
_PRIOR_S_PER_BYTE = 1.0 / 2e8
FINGERPRINT_BYTES = 2


@dataclass(frozen=True)
class BottleneckShape:
    """The architecture: the activation it codes and the sizes of its layers."""

    #: (channels, height, width) of one sample of the activation at the cut
    feature: tuple[int, int, int]
    latent_channels: int = 16
    hidden: int = 64

    def __post_init__(self) -> None:
        c, h, w = self.feature
        if min(c, h, w, self.latent_channels, self.hidden) < 1:
            raise InvalidInput(f"learned codec: sizes must be positive: {self}")
        if h % 2 or w % 2:
            raise InvalidInput(f"learned codec: the activation's height and width must be even "
                               f"(the latent halves them), got {h}x{w}")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.feature[1] // 2, self.feature[2] // 2

    @property
    def feature_bytes(self) -> int:
        return 4 * math.prod(self.feature)


class Bottleneck(nn.Module):
    """Encoder, entropy bottleneck, decoder."""

    def __init__(self, shape: BottleneckShape) -> None:
        super().__init__()
        cin, c, n = shape.feature[0], shape.latent_channels, shape.hidden
        self.shape = shape
        self.encoder = nn.Sequential(nn.Conv2d(cin, n, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(n, c, 1))
        self.entropy = _compressai.entropy_models().EntropyBottleneck(c)
        self.decoder = nn.Sequential(nn.Conv2d(c, n, 1), nn.ReLU(),
                                     nn.ConvTranspose2d(n, cin, 4, stride=2, padding=1))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: the reconstruction and the latent's likelihoods (noisy rounding
        in train mode, true rounding in eval mode)."""
        latent, likelihoods = self.entropy(self.encoder(h))
        return self.decoder(latent), likelihoods

    def quantized(self, h: torch.Tensor) -> torch.Tensor:
        """The rounded latent the receiver will decode, computed without coding it."""
        y = self.encoder(h)
        return self.entropy.quantize(y, "dequantize", self.entropy._get_medians())

    def aux_parameters(self) -> list[nn.Parameter]:
        """The entropy model's quantile estimates, trained by their own loss."""
        return [p for name, p in self.named_parameters() if name.endswith("quantiles")]

    def main_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.endswith("quantiles")]


class LearnedCodec(Codec):
    """A trained bottleneck for one cut of one model; ``setting`` is its rate weight β."""

    name = "learned"

    def __init__(self, bottleneck: Bottleneck, tail_state: Mapping[str, torch.Tensor],
                 meta: Mapping[str, Any], sha256: str,
                 profile: CodecProfile | None = None,
                 files: tuple[Path, Path] | None = None) -> None:
        self.bottleneck = bottleneck.eval()
        self.tail_state = dict(tail_state)
        self.meta = dict(meta)
        self.sha256 = sha256
        #: the artifact it was read from: (weights .safetensors, description .json)
        self.files = files
        self.fingerprint = bytes.fromhex(sha256[:2 * FINGERPRINT_BYTES])
        super().__init__(str(meta["beta"]), profile)

    @property
    def shape(self) -> BottleneckShape:
        return self.bottleneck.shape

    @property
    def model(self) -> str:
        return str(self.meta["model"])

    @property
    def split(self) -> str:
        """The task after which the model is cut (the sender's last task)."""
        return str(self.meta["split"])

    @property
    def edge(self) -> tuple[str, str]:
        """The task edge it is trained for: (the sender's last task, the receiver's first)."""
        return self.split, str(self.meta["next_task"])

    def spec(self, device_flops: float) -> CodecSpec:
        """The planner's cost model, valid on :attr:`edge` only: the encoder takes that
        activation and the receiver's layers are tuned for its decoder."""
        return super().spec(device_flops).only_on([self.edge])

    def prior(self) -> CodecProfile:
        bytes_per_sample = float(self.meta.get("train_bytes_per_sample", 0.0)) or \
            self.shape.feature_bytes / 64
        return CodecProfile(bytes_per_sample / self.shape.feature_bytes,
                            _PRIOR_S_PER_BYTE, _PRIOR_S_PER_BYTE)

    def _check(self, x: np.ndarray) -> np.ndarray:
        arr = as_batch(self.name, x, min_dims=3)
        if tuple(arr.shape[1:]) != self.shape.feature:
            raise InvalidInput(f"codec {self.full_name!r} codes activations of shape "
                               f"{self.shape.feature} (after {self.model}'s task "
                               f"{self.split!r}), got {tuple(arr.shape[1:])}")
        return arr

    def encode(self, x: np.ndarray) -> bytes:
        arr = self._check(x)
        with torch.inference_mode():
            latent = self.bottleneck.encoder(torch.from_numpy(arr))
            strings = self.bottleneck.entropy.compress(latent)
        height, width = self.shape.latent_hw
        out = [wire.header(self.name), self.fingerprint, wire.varint(len(arr)),
               wire.varint(height), wire.varint(width)]
        for s in strings:
            out += [wire.varint(len(s)), s]
        return b"".join(out)

    def decode_latent(self, data: bytes) -> torch.Tensor:
        """The dequantized latent carried by ``data`` (what the decoder network gets)."""
        r = wire.Reader(self.name, data, label=self.full_name)
        if r.take(FINGERPRINT_BYTES, "artifact fingerprint") != self.fingerprint:
            r.fail(f"it was made by another trained codec than {self.full_name!r} "
                   f"(artifact {self.sha256[:12]}); both ends must load the same artifact")
        n = r.varint("batch size")
        hw = (r.varint("latent height"), r.varint("latent width"))
        if hw != self.shape.latent_hw:
            r.fail(f"latent is {hw[0]}x{hw[1]}, this codec's is "
                   f"{self.shape.latent_hw[0]}x{self.shape.latent_hw[1]}")
        strings = [r.take(r.varint(f"length of sample {i}"), f"sample {i}") for i in range(n)]
        r.done()
        if not strings:
            return torch.zeros((0, self.shape.latent_channels, *hw))
        with torch.inference_mode():
            return self.bottleneck.entropy.decompress(strings, hw)

    def decode(self, data: bytes) -> np.ndarray:
        latent = self.decode_latent(data)
        if not len(latent):
            return np.zeros((0, *self.shape.feature), dtype=np.float32)
        with torch.inference_mode():
            return self.bottleneck.decoder(latent).numpy().astype(np.float32, copy=False)

    def tune_stage(self, stage: nn.Module) -> nn.Module:
        """A copy of ``stage`` (a stage module of the model *after* the cut, so any part of
        the tail) with the weights fine-tuned for this codec. Raises InvalidInput when the
        stage holds weights the tail does not (a stage before the cut, another model)."""
        own = stage.state_dict()
        foreign = [k for k in own if k not in self.tail_state]
        if foreign:
            raise InvalidInput(f"codec {self.full_name!r}: the stage holds weights that are "
                               f"not part of {self.model}'s tail after {self.split!r} "
                               f"({foreign[:4]}); only stages after the cut are tuned")
        bad = [k for k, v in own.items() if v.shape != self.tail_state[k].shape]
        if bad:
            raise InvalidInput(f"codec {self.full_name!r}: tail weights {bad[:4]} do not fit "
                               f"this stage's shapes")
        tuned = copy.deepcopy(stage)
        tuned.load_state_dict({k: self.tail_state[k] for k in own})
        return tuned.eval()

    def load_tail(self, tail: nn.Module) -> nn.Module:
        """Load the tail weights fine-tuned for this codec into ``tail`` (a copy of the
        model's stage after the cut); returns it."""
        missing, unexpected = tail.load_state_dict(self.tail_state, strict=False)
        if unexpected or any(k in self.tail_state for k in missing):
            raise InvalidInput(f"codec {self.full_name!r}: its tail weights do not fit this "
                               f"module (unexpected {list(unexpected)[:4]})")
        if missing:
            raise InvalidInput(f"codec {self.full_name!r}: its tail weights lack "
                               f"{list(missing)[:4]}; cut the model after {self.split!r}")
        return tail

    # -- artifacts ----------------------------------------------------------------------
    def save(self, stem: Path) -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` (atomically)."""
        return save_artifact(self.bottleneck, self.tail_state, self.meta, stem)


def save_artifact(bottleneck: Bottleneck, tail_state: Mapping[str, torch.Tensor],
                  meta: Mapping[str, Any], stem: Path) -> tuple[Path, Path]:
    tensors = {f"bottleneck.{k}": v.detach().contiguous()
               for k, v in bottleneck.state_dict().items()}
    tensors.update({f"tail.{k}": v.detach().contiguous() for k, v in tail_state.items()})
    weights, doc = artifact_paths(stem)
    partial = weights.with_name(f"{weights.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial))
    digest = _sha256(partial)
    os.replace(partial, weights)
    body = {"format": FORMAT, **meta, "shape": asdict(bottleneck.shape), "sha256": digest}
    partial = doc.with_name(f"{doc.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(body, indent=2, sort_keys=True))
    os.replace(partial, doc)
    return weights, doc


def load_artifact(stem: Path, profile: CodecProfile | None = None) -> LearnedCodec:
    """A codec from ``<stem>.json`` and ``<stem>.safetensors``; ModelFileError when they
    are missing, corrupt or do not match."""
    weights, doc = artifact_paths(stem)
    return load_files(weights, doc, profile,
                      hint=f"delete {weights.name} and {doc.name} to retrain it")


def load_files(weights: Path, doc: Path, profile: CodecProfile | None = None,
               hint: str = "fetch the codec's artifact again") -> LearnedCodec:
    """A codec from its weights (``.safetensors``) and description (``.json``) files,
    whatever their names (a device's artifact cache names files by hash); ModelFileError
    naming the files when they are missing, corrupt or do not match each other."""
    stem = f"{weights.name} + {doc.name}"
    try:
        meta = json.loads(doc.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        raw = meta["shape"]
        shape = BottleneckShape(tuple(raw["feature"]), int(raw["latent_channels"]),
                                int(raw["hidden"]))
        digest = _sha256(weights)
        if digest != meta["sha256"]:
            raise ValueError(f"the weights' sha256 is {digest[:12]}, the JSON says "
                             f"{str(meta['sha256'])[:12]}")
        tensors = load_file(str(weights))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, InvalidInput,
            SafetensorError) as exc:
        raise ModelFileError(f"learned codec artifact {stem} cannot be read ({exc}); "
                             f"{hint}") from exc
    bottleneck = Bottleneck(shape)
    state = {k.removeprefix("bottleneck."): v for k, v in tensors.items()
             if k.startswith("bottleneck.")}
    for name in _CDF_BUFFERS:  # sized by update(); size them to the stored tables
        key = f"entropy.{name}"
        if key in state:
            getattr(bottleneck.entropy, name).resize_(state[key].shape)
    try:
        bottleneck.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"learned codec artifact {stem} does not fit its declared "
                             f"shape ({exc}); {hint}") from exc
    tail = {k.removeprefix("tail."): v for k, v in tensors.items() if k.startswith("tail.")}
    body = {k: v for k, v in meta.items() if k not in ("format", "shape", "sha256")}
    for key in ("model", "split", "next_task", "beta"):
        if key not in body:
            raise ModelFileError(f"learned codec artifact {stem}: its JSON lacks {key!r}; "
                                 f"{hint}")
    return LearnedCodec(bottleneck, tail, body, meta["sha256"], profile, (weights, doc))


def artifact_paths(stem: Path) -> tuple[Path, Path]:
    """``<stem>.safetensors`` and ``<stem>.json`` (the stem may contain dots, as in β)."""
    return stem.with_name(f"{stem.name}.safetensors"), stem.with_name(f"{stem.name}.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
