"""``edgeswarm bench e2e``: the whole path, measured on a testbed of real agent processes.

For each testbed size (4 and 8 agents by default), on a fresh ``mixed`` testbed whose
agents emulate their speeds and links (:mod:`edgeswarm.testbed`):

- ``discovery_s``: from starting the testbed (N agent processes, on Mosquitto where it is
  installed, else the embedded broker) until an ``es.Cluster`` sees all N online;
- ``deploy_s``: the zoo model placed with the ``gnn`` policy on the agents' measured
  profiles, its stages exported and started on the devices (``Cluster.place`` then
  ``Cluster.deploy``);
- ``requests`` sequential requests, each a batch of held-out images, every output
  compared with the single-device torch model (``wrong_results``: off by more than
  :data:`TOLERANCE`); ``p50_ms``/``p99_ms`` as the client sees them;
- fidelity: ``predicted_ms`` (the simulator on the measured profiles and links, plus the
  coordinator's two transfers) against ``measured_ms`` (the deployment's median);
  ``prediction_error`` = measured / predicted - 1;
- churn: a client thread keeps sending requests while the device doing the most work
  is killed with SIGKILL. ``recovery_s`` runs from the kill to the first correct result
  computed by the re-planned generation; ``failed_requests`` counts requests that raised
  (in both phases), ``requests_during_churn`` the requests the client sent meanwhile.

Every phase is bounded by count and by time; every wait has a timeout.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeswarm.placement.errors import Error, InvalidInput
from edgeswarm.quiet import quiet

if TYPE_CHECKING:
    from edgeswarm.cluster import Model
    from edgeswarm.deployment import Deployment
    from edgeswarm.testbed import Testbed, TestbedConfig

__all__ = ["KEYS", "Churn", "SizeResult", "run"]

Progress = Callable[[str], None]

MODEL = "scene-cnn"
BATCH = 32
LINK = "1gbit:1ms"
#: An output is wrong when any element differs from the torch model's by more than this
#: (fp32 stages: the exported ONNX graphs round differently from torch by ~1e-6).
TOLERANCE = 1e-4
#: Requests the churn client sends before the kill, and after the first recovered result.
BEFORE_KILL = 5
AFTER_RECOVERY = 10
#: Agents are idle when together they use less than this many cores (heartbeats: ~0.01).
IDLE_CORES = 0.2
#: The JSON keys of one testbed size, in order (issue 5, item 7).
KEYS = ("devices", "discovery_s", "deploy_s", "requests", "failed_requests", "wrong_results",
        "p50_ms", "p99_ms", "predicted_ms", "measured_ms", "prediction_error", "recovery_s",
        "requests_during_churn")


@dataclass(frozen=True)
class Churn:
    """What happened around the kill: who died and where the recovery time went."""

    victim: str
    devices_before: tuple[str, ...]
    devices_after: tuple[str, ...]
    lost_s: float | None       # kill -> the coordinator's membership reports it lost
    ready_s: float | None      # kill -> the next generation can take requests
    plan_s: float | None       # re-planning (part of ready_s)
    export_s: float | None     # exporting stages not cached yet (part of ready_s)
    redeploy_s: float | None   # the devices fetching, loading, joining (part of ready_s)
    reason: str


@dataclass
class SizeResult:
    """One testbed size: the figures of :data:`KEYS` plus what explains them."""

    devices: int
    discovery_s: float
    deploy_s: float
    requests: int
    failed_requests: int
    wrong_results: int
    p50_ms: float
    p99_ms: float
    predicted_ms: float
    measured_ms: float
    prediction_error: float
    recovery_s: float | None
    requests_during_churn: int
    plan: tuple[str, ...] = ()                        # devices of the first generation
    profiles_gflops: dict[str, float] = field(default_factory=dict)   # as measured
    churn: Churn | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON object of issue 5, item 7 (exactly :data:`KEYS`)."""
        d = asdict(self)
        return {k: _rounded(d[k]) for k in KEYS}


@dataclass
class _Sent:
    start: float
    end: float
    correct: bool | None      # None: the request raised


def run(devices: Sequence[int] = (4, 8), requests: int = 50, *, model: str = MODEL,
            batch: int = BATCH, link: str = LINK, profile: str = "mixed",
            policy: str = "gnn", budget_s: float = 60.0, churn_s: float = 30.0,
            timeout_s: float = 90.0, progress: Progress | None = None) -> list[SizeResult]:
    """Measure every testbed size in ``devices`` (see the module doc); each result's
    :meth:`~SizeResult.summary` is its JSON object.

    ``requests`` and ``budget_s`` bound the steady phase (whichever ends it first),
    ``churn_s`` the churn phase, ``timeout_s`` each wait for the testbed and a deploy.
    """
    from edgeswarm.device_agent.manifest import parse_link

    if not devices or any(n < 2 for n in devices) or requests < 1 or batch < 1:
        raise InvalidInput(f"bench e2e needs testbed sizes >= 2 (a device to kill and one "
                           f"to recover on), requests >= 1 and batch >= 1; got devices="
                           f"{list(devices)}, requests={requests}, batch={batch}")
    parse_link(link)  # a bad spec fails here, before any process starts
    say = progress or (lambda _msg: None)
    say(f"loading {model}")
    prepared, inputs, expected = _workload(model, batch)
    _warm_up(prepared, policy)
    out = []
    for n in devices:
        with quiet():
            out.append(_one(n, prepared, inputs, expected, requests, link=link,
                            profile=profile, policy=policy, budget_s=budget_s,
                            churn_s=churn_s, timeout_s=timeout_s, say=say))
    return out


def _one(n: int, model: Model, inputs: list[Inputs], expected: list[Outputs],
         requests: int, *, link: str, profile: str, policy: str, budget_s: float,
         churn_s: float, timeout_s: float, say: Progress) -> SizeResult:
    from edgeswarm.testbed import TestbedConfig
    from edgeswarm.testbed_profile import load_profile

    with _broker() as broker:
        config = TestbedConfig(profile=load_profile(profile, n, link=link), broker=broker,
                               cluster=f"e2e-{secrets.token_hex(3)}", start_timeout_s=timeout_s)
        return _on(config, model, inputs, expected, requests, policy=policy, budget_s=budget_s,
                   churn_s=churn_s, timeout_s=timeout_s, say=say)


def _on(config: TestbedConfig, model: Model, inputs: list[Inputs], expected: list[Outputs],
        requests: int, *, policy: str, budget_s: float, churn_s: float, timeout_s: float,
        say: Progress) -> SizeResult:
    from edgeswarm.cluster import Cluster
    from edgeswarm.testbed import Testbed

    n = len(config.profile.devices)
    say(f"{n} agents: starting the testbed")
    t0 = time.monotonic()
    with Testbed(config) as tb, Cluster.connect(tb.broker_uri, tb.cluster, tb.key, expect=n,
                                                timeout_s=timeout_s) as cluster:
        discovery_s = time.monotonic() - t0
        gflops = {s.device.id: round(s.device.flops / 1e9, 1) for s in cluster.devices}
        say(f"{n} agents: waiting for them to finish starting up")
        _settle(tb, timeout_s)
        say(f"{n} agents: placing {model.name} ({policy}) and deploying")
        t0 = time.monotonic()
        plan = cluster.place(model, policy=policy)
        with cluster.deploy(model, plan, policy=policy, timeout_s=timeout_s) as dep:
            deploy_s = time.monotonic() - t0
            first = dep.generations[0]
            say(f"{n} agents: {requests} requests on {', '.join(dep.devices)}")
            steady = _steady(dep, inputs, expected, requests, budget_s)
            measured_s = first.measured_median_s
            say(f"{n} agents: kill -9 of a device in use while requests run")
            sent, churn, recovery_s = _churn(tb, dep, inputs, expected, churn_s, timeout_s)
    lat = np.array([s.end - s.start for s in steady if s.correct is not None]) * 1e3
    every = steady + sent
    return SizeResult(
        devices=n, discovery_s=discovery_s, deploy_s=deploy_s, requests=len(steady),
        failed_requests=sum(s.correct is None for s in every),
        wrong_results=sum(s.correct is False for s in every),
        p50_ms=_pct(lat, 50), p99_ms=_pct(lat, 99), predicted_ms=first.predicted_s * 1e3,
        measured_ms=measured_s * 1e3, prediction_error=measured_s / first.predicted_s - 1,
        recovery_s=recovery_s, requests_during_churn=len(sent), plan=first.devices,
        profiles_gflops=gflops, churn=churn)


def _steady(dep: Deployment, inputs: list[Inputs], expected: list[Outputs], requests: int,
            budget_s: float) -> list[_Sent]:
    deadline = time.monotonic() + budget_s
    out: list[_Sent] = []
    for i in range(requests):
        if out and time.monotonic() > deadline:
            break
        out.append(_request(dep, inputs[i % len(inputs)], expected[i % len(inputs)]))
    return out


def _churn(tb: Testbed, dep: Deployment, inputs: list[Inputs], expected: list[Outputs],
           churn_s: float, timeout_s: float) -> tuple[list[_Sent], Churn, float | None]:
    """A client thread sends requests; SIGKILL the busiest device once it has sent
    :data:`BEFORE_KILL`; stop :data:`AFTER_RECOVERY` requests after the first correct
    result of the next generation (or at ``churn_s``)."""
    from edgeswarm.device_agent import membership as ms

    cv = threading.Condition()
    sent: list[_Sent] = []
    lost_at: dict[str, float] = {}
    stop = threading.Event()
    deadline = time.monotonic() + churn_s

    def on_change(_m: ms.Membership, event: ms.Event) -> None:
        if isinstance(event, ms.DeviceLost):
            with cv:
                lost_at.setdefault(event.device, time.monotonic())

    def client() -> None:
        for i in range(1_000_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            one = _request(dep, inputs[i % len(inputs)], expected[i % len(inputs)])
            with cv:
                sent.append(one)
                cv.notify_all()

    dep.cluster.coordinator.on_change(on_change)
    thread = threading.Thread(target=client, name="edgeswarm-bench-client", daemon=True)
    thread.start()
    with cv:
        cv.wait_for(lambda: len(sent) >= BEFORE_KILL, max(0.0, deadline - time.monotonic()))
    before, devices = dep.generation, dep.devices
    victim = _busiest(dep)
    killed_at = time.monotonic()
    tb.kill(victim)

    def first_recovered() -> int | None:
        new = next((g for g in list(dep.generations) if g.number > before), None)
        if new is None:
            return None
        # a request that ended after the next generation was up was computed by it (the
        # deployment serves one request at a time and swaps generations between them)
        return next((i for i, s in enumerate(sent) if s.correct and s.end >= new.ready_at),
                    None)

    with cv:
        cv.wait_for(lambda: (i := first_recovered()) is not None
                    and len(sent) >= i + 1 + AFTER_RECOVERY,
                    max(0.0, deadline - time.monotonic()))
        index = first_recovered()
    stop.set()
    thread.join(timeout_s)
    if thread.is_alive():
        raise Error(f"bench e2e: the client's request did not end within {timeout_s:.0f} s "
                    f"of the churn phase's end")
    new = next((g for g in dep.generations if g.number > before), None)
    churn = Churn(victim=victim, devices_before=devices,
                  devices_after=new.devices if new else (),
                  lost_s=_since(lost_at.get(victim), killed_at),
                  ready_s=_since(new.ready_at if new else None, killed_at),
                  plan_s=new.plan_s if new else None, export_s=new.export_s if new else None,
                  redeploy_s=new.deploy_s if new else None, reason=new.reason if new else "")
    recovery = sent[index].end - killed_at if index is not None else None
    return list(sent), churn, recovery


def _settle(tb: Testbed, timeout_s: float, window_s: float = 0.5) -> None:
    """Wait until the agent processes are idle (together under :data:`IDLE_CORES` over
    ``window_s``), or ``timeout_s``. An agent announces itself before its warm-up (timing
    int8, importing torch and ONNX Runtime: ~1.2 s of CPU each, at a lower priority); N of
    them doing that on this machine's few cores would slow the first requests of the
    others, which real devices, each with its own CPU, do not do to each other."""
    import psutil

    procs = []
    for status in tb.status():
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(status.pid))
    deadline = time.monotonic() + timeout_s

    def busy() -> float:
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.cpu_percent(None) / 100
        return total

    busy()  # the first reading only starts the interval
    while time.monotonic() < deadline:
        time.sleep(window_s)
        if busy() < IDLE_CORES:
            return


def _request(dep: Deployment, x: Inputs, want: Outputs) -> _Sent:
    start = time.monotonic()
    try:
        got = _flat(dep.run(*x))
    except Error:
        return _Sent(start, time.monotonic(), None)
    end = time.monotonic()
    correct = len(got) == len(want) and all(
        g.shape == w.shape and float(np.max(np.abs(g - w), initial=0.0)) <= TOLERANCE
        for g, w in zip(got, want, strict=False))
    return _Sent(start, end, correct)


def _busiest(dep: Deployment) -> str:
    """The device of the current generation that runs the most FLOPs."""
    graph = dep.model.graph
    load: dict[str, float] = dict.fromkeys(dep.devices, 0.0)
    for task in graph.tasks:
        for device in dep.plan.assignments.get(task.id, ()):
            if device in load:
                load[device] += task.flops
    return max(load, key=lambda d: load[d])


# --- the workload -----------------------------------------------------------------------

Inputs = tuple[np.ndarray, ...]
Outputs = list[np.ndarray]


def _workload(name: str, batch: int) -> tuple[Model, list[Inputs], list[Outputs]]:
    """The zoo model as a placeable Model (traced at ``batch``), up to 8 distinct batches
    of held-out inputs and the torch model's outputs for each."""
    import torch

    from edgeswarm.cluster import Model
    from edgeswarm.models import zoo

    z = zoo.load(name)
    rows = len(z.heldout)
    if rows < batch:
        raise InvalidInput(f"{name} has {rows} held-out inputs, fewer than a batch of {batch}")
    batches = [z.heldout.batch(i * batch, batch) for i in range(min(8, rows // batch))]
    with torch.inference_mode():
        expected = [_flat(z.module(*b)) for b in batches]
    inputs = [tuple(t.numpy() for t in b) for b in batches]
    return Model(z.name, z.module, batches[0], tuple(z.calibration)), inputs, expected


def _warm_up(model: Model, policy: str) -> None:
    """Trace the model, load the policy and the exporter once, so that the first testbed
    size does not pay for imports that the next ones would not."""
    import tempfile
    from pathlib import Path

    from edgeswarm.cluster import DEPLOYABLE
    from edgeswarm.models.partition import export, partition
    from edgeswarm.placement.cluster import Cluster as Topology
    from edgeswarm.placement.cluster import Device, DeviceId, LinkSpec
    from edgeswarm.placement.plan import Plan
    from edgeswarm.placement.policies import place

    toy = Topology((Device(DeviceId("a"), 1e10, 1 << 30), Device(DeviceId("b"), 1e10, 1 << 30)),
                   default_link=LinkSpec(1e8, 1e-3))
    place(model.graph, toy, policy, DEPLOYABLE)
    whole = Plan({t.id: (DeviceId("a"),) for t in model.graph.tasks})
    part = partition(model.module, model.example_inputs, whole, model.trace())
    with tempfile.TemporaryDirectory(prefix="edgeswarm-bench-e2e-") as tmp:
        export(part, part.stage_inputs(*model.example_inputs)[0], Path(tmp), "onnx")


def _flat(value: Any) -> Outputs:
    if isinstance(value, (tuple, list)):
        return [a for v in value for a in _flat(v)]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return [np.asarray(value)]


# --- small helpers ----------------------------------------------------------------------

@contextlib.contextmanager
def _broker() -> Iterator[str | None]:
    """Mosquitto's URI where it is installed, else None (the testbed's embedded broker).
    Mosquitto, because amqtt 0.11 (the embedded broker) sometimes drops a client that
    connects while another subscribes ("dictionary changed size during iteration"), and
    an agent that gets no CONNACK at start exits: with 8 agents starting together, about
    one testbed in ten did not come up."""
    from edgeswarm.device_agent.broker import Mosquitto

    mosquitto = Mosquitto()
    try:
        mosquitto.start()
    except Error:   # not installed (RuntimeNotAvailable) or would not start
        yield None
        return
    try:
        yield mosquitto.uri
    finally:
        mosquitto.stop()



def _pct(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q)) if len(ms) else float("nan")


def _since(at: float | None, t0: float) -> float | None:
    return None if at is None else at - t0


def _rounded(x: Any) -> Any:
    return round(x, 4) if isinstance(x, float) else x
