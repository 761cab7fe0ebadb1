"""The deploy manifest (``edgeswarm.manifest/1``): which device runs which shard, from
which artifact, and how the ranks of the deployment's gloo group are wired.

A manifest is plain JSON. Rank 0 is always the coordinator (device id ``"coordinator"``):
it hosts the rendezvous store, feeds the first stage and collects the last. Each shard
names its artifact by sha256 and size, so an agent refuses anything else.

A manifest stored as a file carries a ``"signature"``: HMAC-SHA256 under the cluster key
over the canonical JSON of every other field (``sign_manifest``/``verify_manifest``).
Inside a ``Deploy`` command it travels unsigned, because the command's envelope is signed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from edgeswarm.device_agent._signing import Model, Rejected, describe, digest, signature_matches
from edgeswarm.device_agent.topics import NAME_PATTERN
from edgeswarm.placement.errors import InvalidInput

FORMAT = "edgeswarm.manifest/1"
COORDINATOR = "coordinator"
RUNTIMES = ("torch", "onnx", "onnx-int8", "tflite-int8", "safetensors", "snn")

Runtime = Literal["torch", "onnx", "onnx-int8", "tflite-int8", "safetensors", "snn"]

_URL_SCHEMES = ("http://", "https://", "file://")
_LINK = re.compile(rf"({NAME_PATTERN})->({NAME_PATTERN})")


class Artifact(Model):
    """A file an agent fetches and verifies before loading it."""

    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # a file name, kept as suffix
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")   # lowercase hex
    size: int = Field(ge=0)                          # bytes; a download is cut here
    url: str                                         # http://, https:// or file://

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str) -> str:
        if not url.startswith(_URL_SCHEMES):
            raise ValueError(f"url {url!r} must start with one of {', '.join(_URL_SCHEMES)}")
        return url


class CodecRef(Model):
    """A feature codec on a value a shard sends or receives over the network: its name
    (``fp16``, ``int8``, ``learned:1e-05``; ``none``: the value travels as it is) and, for
    a learned codec, its artifact files (weights and description), fetched and verified
    like the shard's own artifact."""

    name: str = Field(pattern=r"^[a-z0-9]{1,32}(:[A-Za-z0-9_.+-]{1,32})?$")
    artifacts: list[Artifact] = Field(default_factory=list, max_length=4)


class Shard(Model):
    """One piece of the model on one device, wired to other ranks."""

    id: str = Field(pattern=rf"^{NAME_PATTERN}$")
    device: str = Field(pattern=rf"^{NAME_PATTERN}$")
    runtime: Runtime
    artifact: Artifact
    recv_from: list[int]   # ranks whose tensors (in this order) are this shard's inputs
    send_to: list[int]     # ranks that receive all of this shard's outputs
    builder: str | None = None           # runtime "safetensors"/"torch": a registered builder
    params: dict[str, Any] = Field(default_factory=dict)  # builder parameters (plain JSON)
    tp_group: list[int] | None = None    # ranks that all-reduce with this shard
    # codecs of the values that cross the network, one per input / output in order (None:
    # no codec on any): outputs are encoded before they are sent to another rank, inputs
    # from another rank decoded before the shard runs; local hand-offs are never coded
    send_codecs: list[CodecRef] | None = None
    recv_codecs: list[CodecRef] | None = None


class LinkShape(Model):
    """Data-plane shaping of one directed link (testbed emulation only)."""

    bandwidth_Bps: float = Field(gt=0)
    latency_s: float = Field(ge=0)


# Link specs, as Linux tc writes rates: "bit" units are bits/s, "bps" units bytes/s.
_RATE_UNITS = {"bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
               "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
               "b/s": 1.0, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9}   # "/s": bytes (B) only
_DELAY_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?"
_SPEC = re.compile(rf"\s*(?P<rate>{_NUMBER})\s*(?P<runit>[a-z/]+)"
                   rf"(?:\s*:\s*(?P<delay>{_NUMBER})\s*(?P<dunit>[a-z]+))?\s*", re.IGNORECASE)
LINK_SPEC_HELP = ("RATE[:LATENCY], e.g. 100mbit:5ms; rates in bit/kbit/mbit/gbit (bits/s) or "
                  "bps/kbps/mbps/gbps, B/s, KB/s, MB/s, GB/s (bytes/s); latency in s/ms/us")


def parse_link(spec: str) -> LinkShape:
    """The link a spec like ``100mbit:5ms`` describes (bandwidth, then one-way latency).

    Rates follow Linux tc: ``bit``, ``kbit``, ``mbit``, ``gbit`` are bits per second and
    ``bps``, ``kbps``, ``mbps``, ``gbps`` bytes per second (so are ``B/s`` ... ``GB/s``);
    prefixes are decimal (k = 1000). Latency is in ``s``, ``ms`` or ``us``; without it the
    link has none. Raises InvalidInput naming the spec otherwise.
    """
    if not isinstance(spec, str):
        raise InvalidInput(f"link spec {spec!r} must be a string like 100mbit:5ms")
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise InvalidInput(f"link spec {spec!r} is not {LINK_SPEC_HELP}")
    runit = match["runit"]
    if "/" in runit and not runit.endswith("B/s"):
        prefix = runit[:-3]
        raise InvalidInput(f"link spec {spec!r}: rate unit {runit!r} is ambiguous; write "
                           f"{prefix.lower()}bit for bits/s or {prefix.upper()}B/s for bytes/s")
    per_s = _RATE_UNITS.get(runit.lower())
    if per_s is None:
        raise InvalidInput(f"link spec {spec!r}: unknown rate unit {runit!r}; "
                           f"use bit, kbit, mbit, gbit (bits/s) or bps, kbps, mbps, gbps, "
                           f"B/s, KB/s, MB/s, GB/s (bytes/s)")
    bandwidth = float(match["rate"]) * per_s
    latency = 0.0
    if match["delay"] is not None:
        scale = _DELAY_UNITS.get(match["dunit"].lower())
        if scale is None:
            raise InvalidInput(f"link spec {spec!r}: unknown latency unit {match['dunit']!r}; "
                               f"use s, ms or us")
        latency = float(match["delay"]) * scale
    if not 0 < bandwidth < float("inf") or not latency < float("inf"):
        raise InvalidInput(f"link spec {spec!r}: the rate must be > 0 and both numbers finite")
    return LinkShape(bandwidth_Bps=bandwidth, latency_s=latency)


def format_link(link: LinkShape) -> str:
    """A short spec for ``link`` (``100mbit:5ms``), rounded for display: parse_link reads it."""
    bits = link.bandwidth_Bps * 8
    rate = next((f"{bits / scale:.4g}{unit}" for scale, unit in
                 ((1e9, "gbit"), (1e6, "mbit"), (1e3, "kbit")) if bits >= scale),
                f"{bits:.4g}bit")
    ms = link.latency_s * 1e3
    delay = f"{ms:.4g}ms" if ms >= 1 or ms == 0 else f"{ms * 1e3:.4g}us"
    return f"{rate}:{delay}"


class Manifest(Model):
    """Everything an agent needs to take part in one generation of a deployment."""

    format: Literal["edgeswarm.manifest/1"] = "edgeswarm.manifest/1"
    deployment: str = Field(pattern=rf"^{NAME_PATTERN}$")
    generation: int = Field(ge=0)
    model: str
    store_host: str = Field(min_length=1)
    store_port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=1)
    ranks: dict[str, int]     # device id -> rank; "coordinator" -> 0
    shards: list[Shard]
    timeout_s: float = Field(default=10.0, gt=0)
    links: dict[str, LinkShape] = Field(default_factory=dict)  # "src->dst" device ids

    @model_validator(mode="after")
    def _wiring(self) -> Manifest:
        _check_ranks(self.ranks, self.world_size)
        seen: set[str] = set()
        for i, shard in enumerate(self.shards):
            where = f"shards[{i}]"
            if shard.id in seen:
                raise ValueError(f"{where}.id: shard id {shard.id!r} appears twice")
            seen.add(shard.id)
            if shard.device not in self.ranks:
                raise ValueError(f"{where}.device: device {shard.device!r} has no rank in ranks")
            for field in ("recv_from", "send_to", "tp_group"):
                for rank in getattr(shard, field) or ():
                    if not 0 <= rank < self.world_size:
                        raise ValueError(f"{where}.{field}: rank {rank} does not exist "
                                         f"(world_size is {self.world_size})")
            if shard.runtime in ("torch", "safetensors") and not shard.builder:
                raise ValueError(f"{where}.builder: runtime {shard.runtime!r} needs a builder name")
        for key in self.links:
            match = _LINK.fullmatch(key)
            if match is None:
                raise ValueError(f"links[{key!r}]: expected 'src->dst' with two device ids")
            for device in match.groups():
                if device not in self.ranks:
                    raise ValueError(f"links[{key!r}]: device {device!r} has no rank in ranks")
        return self

    def shards_of(self, device: str) -> list[Shard]:
        """The device's shards, in manifest (pipeline) order."""
        return [s for s in self.shards if s.device == device]

    def rank_of(self, device: str) -> int:
        """The device's rank in this generation's group."""
        try:
            return self.ranks[device]
        except KeyError:
            raise InvalidInput(f"device {device!r} is not in deployment {self.deployment!r} "
                               f"(ranks: {', '.join(sorted(self.ranks))})") from None


def _check_ranks(ranks: dict[str, int], world_size: int) -> None:
    if ranks.get(COORDINATOR) != 0:
        raise ValueError(f"ranks: {COORDINATOR!r} must have rank 0")
    if len(ranks) != world_size:
        raise ValueError(f"ranks: {len(ranks)} devices for world_size {world_size}; "
                         "every rank in [0, world_size) needs exactly one device")
    by_rank: dict[int, str] = {}
    for device, rank in ranks.items():
        if not 0 <= rank < world_size:
            raise ValueError(f"ranks[{device!r}]: rank {rank} is outside [0, {world_size})")
        if rank in by_rank:
            raise ValueError(f"ranks[{device!r}]: rank {rank} is already {by_rank[rank]!r}'s rank")
        if re.fullmatch(NAME_PATTERN, device) is None:
            raise ValueError(f"ranks[{device!r}]: not a valid device id")
        by_rank[rank] = device


def sign_manifest(key: bytes, manifest: Manifest) -> dict[str, Any]:
    """The manifest as a JSON dict with a ``"signature"`` field added."""
    data = manifest.model_dump(mode="json")
    data["signature"] = digest(key, data)
    return data


def verify_manifest(key: bytes, data: dict[str, Any]) -> Manifest:
    """Check the signature, then the schema; raise Rejected ("unsigned", "bad_signature",
    "malformed" or "schema") naming what was wrong."""
    if not isinstance(data, dict):
        raise Rejected("malformed", f"a manifest is a JSON object, not {type(data).__name__}")
    body = {k: v for k, v in data.items() if k != "signature"}
    sig = data.get("signature")
    if not sig:
        raise Rejected("unsigned", "the manifest has no 'signature'; sign it with the cluster key")
    try:
        matches = isinstance(sig, str) and signature_matches(key, body, sig)
    except (TypeError, ValueError) as e:  # not representable as canonical JSON
        raise Rejected("malformed", f"the manifest is not plain JSON: {e}") from None
    if not matches:
        raise Rejected("bad_signature", "the manifest's signature does not match: it was "
                       "changed after signing, or signed with another cluster key")
    try:
        return Manifest.model_validate(body)
    except ValidationError as e:
        raise Rejected("schema", f"invalid manifest: {describe(e)}") from None


def write_signed(path: str | Path, key: bytes, manifest: Manifest) -> Path:
    """Write the signed manifest as JSON to ``path``."""
    p = Path(path)
    p.write_text(json.dumps(sign_manifest(key, manifest), indent=2, sort_keys=True) + "\n")
    return p


def read_signed(path: str | Path, key: bytes) -> Manifest:
    """Read and verify a signed manifest file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidInput(f"cannot read manifest {p}: {e.strerror or e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise Rejected("malformed", f"manifest {p} is not JSON: {e}") from None
    return verify_manifest(key, data)
