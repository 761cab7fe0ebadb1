"""``edgeswarm bench compression``'s end-to-end run: a split model on a slow link, with and
without codecs, on a testbed of two real agent processes.

The setting of the issue: a ``camera`` and a ``server`` agent (:mod:`edgeswarm.testbed`)
joined by an emulated 10 Mbit/s link with 20 ms one-way latency; the application (the
coordinator, rank 0) sits next to the camera (its link to both agents is emulated as
10 Gbit/s without delay, so the input and the result cost next to nothing and the slow link
is the one in between). scene-cnn is cut after ``conv1`` (the learned codec's cut): the
camera runs ``conv0``-``conv1`` and the sender half of the codec, the server the receiver
half and the rest. For each codec (``none``, ``fp16``, ``int8``, ``learned``) the plan is
deployed through the ordinary path (``Cluster.deploy``: shards, manifest, codec artifacts)
and ``requests`` held-out scenes are sent one at a time; the figures:

- ``latency_ms_p50``: the client's median request latency (p90 beside it);
- ``predicted_ms``: the simulator's latency for the plan with the measured codec table,
  plus the coordinator's two transfers (what the deployment predicts);
- ``bytes_per_request``: the data-plane message the camera sends the server per request
  (the codec's payload and the message header), computed here by the same code on the
  same activation;
- ``accuracy``: top-1 on the scenes sent; ``agreement``: top-1 equal to the unsplit model;
- ``wrong_results``: results that differ from the same split run in this process (stages
  in torch, the same codec) by more than :data:`TOLERANCE` of the logits' range.

Every phase is bounded by count and time. Each deployment gets its own coordinator:
two deployments of one coordinator both number their first generation 1, and the data
plane's rendezvous keys are per generation number (not per deployment), so the second one
could read the first one's stale addresses.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeswarm.placement.errors import InvalidInput
from edgeswarm.quiet import quiet

if TYPE_CHECKING:
    from edgeswarm.cluster import Model
    from edgeswarm.models.codecs import Codec
    from edgeswarm.testbed_profile import TestbedProfile

Progress = Callable[[str], None]

LINK = "10mbit:20ms"
#: The application's link to the agents: next to the camera, next to nothing.
COORDINATOR_LINK = "10gbit:0ms"
DEVICES = ("camera", "server")
SPLIT = "conv1"
CODECS = ("none", "fp16", "int8", "learned")
REQUESTS = 100
#: Requests sent before timing (the first ones load lazily initialised code).
WARM_UP = 2
#: A result is wrong when it differs from the in-process split by more than this share
#: of the logits' largest magnitude (ONNX stages round differently from torch by ~1e-6;
#: a learned codec's rounding of the latent may flip one symbol: ~1e-3).
TOLERANCE = 1e-2
#: The coordinator's heartbeat timeout here: exporting stages and coding in this process
#: may keep its MQTT thread from the GIL for more than the default 1.5 s on a loaded host.
HEARTBEAT_TIMEOUT_S = 5.0


def profile(link: str = LINK) -> TestbedProfile:
    """The two devices, ``link`` between them, the coordinator next to both."""
    from edgeswarm.testbed_profile import TestbedDevice, TestbedProfile

    links = {"*": link, "coordinator": COORDINATOR_LINK}
    return TestbedProfile(devices=[TestbedDevice(id=d, links=links) for d in DEVICES],
                          default_link=link)


def run(requests: int = REQUESTS, *, link: str = LINK, codecs: Sequence[str] = CODECS,
        budget_s: float = 60.0, timeout_s: float = 90.0,
        progress: Progress | None = None) -> dict[str, Any]:
    """Measure every codec of ``codecs`` end to end (see the module doc): ``{"link",
    "devices", "split", "requests", "runs": [...]}``. ``budget_s`` bounds each codec's
    requests, ``timeout_s`` each wait for the testbed and a deploy."""
    from edgeswarm.device_agent.manifest import parse_link

    if requests < 1:
        raise InvalidInput(f"the end-to-end run needs at least one request, got {requests}")
    unknown = [c for c in codecs if c.partition(":")[0] not in CODECS]
    if unknown or not codecs:
        raise InvalidInput(f"end-to-end codecs must be among {', '.join(CODECS)}; got "
                           f"{list(codecs) or 'none'}")
    parse_link(link)  # a bad spec fails before any process starts
    say = progress or (lambda _msg: None)
    say("end to end: loading scene-cnn and measuring the codecs")
    model, images, labels, teacher = _workload(requests)
    from edgeswarm.codec_plans import full_name, measured
    from edgeswarm.models.codecs.simple import NoneCodec

    known = measured(model, [c for c in codecs if c != "none"])
    chosen = [NoneCodec() if name == "none" else known.codec(full_name(name))
              for name in codecs]
    runs = []
    with quiet(), _testbed(link, timeout_s) as tb:
        for codec in chosen:
            say(f"end to end: {codec.full_name}: deploying on {' -> '.join(DEVICES)}")
            runs.append(_one(tb, model, codec, images, labels, teacher, budget_s, timeout_s,
                             say))
    return {"link": link, "devices": len(DEVICES), "split": SPLIT, "requests": requests,
            "runs": runs}


def _one(tb: Any, model: Model, codec: Codec, images: np.ndarray, labels: np.ndarray,
         teacher: np.ndarray, budget_s: float, timeout_s: float, say: Progress
         ) -> dict[str, Any]:
    from edgeswarm.cluster import Cluster
    from edgeswarm.models.codecs.e2e import split_with_codec

    split = split_with_codec(model.module, model.example_inputs, SPLIT, codec,
                             devices=DEVICES, traced=model.trace())
    with Cluster.connect(tb.broker_uri, tb.cluster, tb.key, expect=len(DEVICES),
                         timeout_s=timeout_s, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S
                         ) as cluster, \
            cluster.deploy(model, split.plan, timeout_s=timeout_s) as dep:
        for i in range(WARM_UP):
            dep.run(images[i:i + 1])
        say(f"end to end: {codec.full_name}: {len(images)} requests")
        latencies: list[float] = []
        outputs: list[np.ndarray] = []
        deadline = time.monotonic() + budget_s
        for i in range(len(images)):
            if outputs and time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            outputs.append(np.asarray(dep.run(images[i:i + 1])))
            latencies.append(time.perf_counter() - t0)
        predicted_s = dep.predicted_latency_s
    got = np.concatenate(outputs)
    n = len(got)
    want = _in_process(split, images[:n])
    scale = float(np.abs(want).max())
    wrong = int((np.abs(got - want).max(axis=1) > TOLERANCE * scale).sum())
    ms = np.array(latencies) * 1e3
    return {"codec": codec.name, "setting": codec.setting, "requests": n,
            "latency_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "latency_ms_p90": round(float(np.percentile(ms, 90)), 2),
            "predicted_ms": round(predicted_s * 1e3, 2),
            "bytes_per_request": _wire_bytes(split, codec, images[:n]),
            "accuracy": float((got.argmax(1) == labels[:n]).mean()),
            "agreement": float((got.argmax(1) == teacher[:n]).mean()),
            "wrong_results": wrong}


def summary(e2e: dict[str, Any]) -> dict[str, Any]:
    """The issue's target read off an end-to-end result: each codec's p50 against ``none``
    on the same link (a ratio, so timing noise weighs less)."""
    runs = {(r["codec"] if r["setting"] is None else f"{r['codec']}:{r['setting']}"): r
            for r in e2e["runs"]}
    base = runs.get("none")
    out: dict[str, Any] = {"speedup_vs_none": {}, "learned_faster_than_none": None}
    if base is None:
        return out
    for name, r in runs.items():
        if name != "none":
            out["speedup_vs_none"][name] = round(base["latency_ms_p50"] / r["latency_ms_p50"], 2)
    learned = [r for r in e2e["runs"] if r["codec"] == "learned"]
    if learned:
        out["learned_faster_than_none"] = all(
            r["latency_ms_p50"] < base["latency_ms_p50"] for r in learned)
    return out


# -- helpers -------------------------------------------------------------------------------
def _workload(requests: int) -> tuple[Model, np.ndarray, np.ndarray, np.ndarray]:
    """scene-cnn, its first ``requests`` held-out scenes, labels, the unsplit model's
    top-1 on them."""
    import torch

    from edgeswarm.cluster import Model
    from edgeswarm.models import zoo

    z = zoo.load("scene-cnn")
    if requests > len(z.heldout):
        raise InvalidInput(f"scene-cnn has {len(z.heldout)} held-out scenes; asked for "
                           f"{requests} requests")
    images = z.heldout.inputs[0][:requests]
    labels = z.heldout.labels
    assert labels is not None  # scene-cnn is scored by accuracy
    with torch.inference_mode():
        teacher = z.module(images).argmax(1).numpy()
    model = Model(z.name, z.module, tuple(z.example_inputs), tuple(z.calibration))
    return model, images.numpy(), labels[:requests].numpy(), teacher


def _in_process(split: Any, images: np.ndarray) -> np.ndarray:
    """The split run in this process: torch stages, the same codec, one request a time."""
    import torch

    return np.concatenate([split.run(torch.from_numpy(images[i:i + 1])).numpy()
                           for i in range(len(images))])


def _wire_bytes(split: Any, codec: Codec, images: np.ndarray) -> float:
    """Mean size of the data-plane message from the camera to the server."""
    import torch

    from edgeswarm.device_agent import wire

    sizes = []
    with torch.inference_mode():
        for i in range(len(images)):
            (activation,) = split.head(torch.from_numpy(images[i:i + 1]))
            value = activation.numpy()
            if codec.name != "none":
                value = np.frombuffer(codec.encode(value), dtype=np.uint8)
            sizes.append(len(wire.encode([value], 0)))
    return round(float(np.mean(sizes)), 1)


@contextmanager
def _testbed(link: str, timeout_s: float) -> Iterator[Any]:
    from edgeswarm.testbed import Testbed, TestbedConfig

    config = TestbedConfig(profile=profile(link), cluster=f"codecs-{secrets.token_hex(3)}",
                           start_timeout_s=timeout_s)
    with Testbed(config) as tb:
        yield tb

