"""The cluster as an application sees it: find it, plan a model on it, deploy the model.

>>> cluster = es.Cluster.discover(cluster="lab")          # zeroconf finds the broker
>>> plan = cluster.place("scene-cnn", policy="gnn")
>>> with cluster.deploy("scene-cnn", plan) as deployment:
...     y = deployment.run(x)

:class:`Cluster` wraps a :class:`~edgeswarm.device_agent.coordinator.Coordinator` (the
signed MQTT control plane, the membership reducer) and turns what the agents report into
the planner's vocabulary: each online device's measured profile becomes a placement
``Device``; links are measured through each agent's data probe, and where an agent
emulates a link (the testbed) its shape comes on top: the data plane sleeps the emulated
delay and then sends on the real network, so a message pays both.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeswarm.device_agent.artifacts import ArtifactServer
from edgeswarm.device_agent.coordinator import Coordinator
from edgeswarm.device_agent.manifest import COORDINATOR, LinkShape
from edgeswarm.device_agent.protocol import DeviceState
from edgeswarm.placement.cluster import Cluster as Topology
from edgeswarm.placement.cluster import Device, DeviceId, Link, LinkSpec
from edgeswarm.placement.errors import InvalidInput, PlacementInfeasible
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.policies import Options
from edgeswarm.placement.taskgraph import TaskGraph

if TYPE_CHECKING:
    from edgeswarm.deployment import Deployment
    from edgeswarm.models.graph import Traced

log = logging.getLogger("edgeswarm.sdk")

#: Placement options for deployable plans: layer cuts only (tensor-parallel groups are
#: planned by their own issue's code path; codecs only where ``place(codecs=...)`` names
#: them, with their measured table).
DEPLOYABLE = Options(tp=False, codecs=False)

#: Data-probe measurements per device (the best one stands for the link), and their size:
#: a few MB, so that thread start-up and scheduling on a busy machine weigh little.
PROBES = 3
PROBE_BYTES = 4 << 20


@dataclass
class Model:
    """A model made ready to place: its module, inputs, traced graph (cached)."""

    name: str
    module: Any
    example_inputs: tuple[Any, ...]
    calibration: tuple[Any, ...] | None = None
    traced: Traced | None = field(default=None, repr=False)
    zoo: bool = False   # ``name`` is a zoo model's: runtimes convert it the zoo's way

    @property
    def graph(self) -> TaskGraph:
        return self.trace().graph

    def trace(self) -> Traced:
        if self.traced is None:
            from edgeswarm.models.graph import trace

            self.traced = trace(self.module, self.example_inputs, self.name)
        return self.traced


def prepare(model: Any, example_inputs: Sequence[Any] | None = None) -> Model:
    """A zoo name, an ``nn.Module`` (with ``example_inputs``) or an ``.onnx`` path (its
    example inputs are optional: they set the batch the costs are for) as a :class:`Model`."""
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        from edgeswarm.models.onnx_graph import trace as trace_onnx

        traced = trace_onnx(model, example_inputs)   # cut by edgeswarm.models.onnx_partition
        return Model(traced.graph.name, traced.module, traced.example_inputs, traced=traced)
    if isinstance(model, str):
        from edgeswarm.models import zoo

        z = zoo.load(model)
        inputs = tuple(example_inputs) if example_inputs is not None else z.example_inputs
        return Model(z.name, z.module, inputs, tuple(z.calibration), zoo=True)
    import torch

    if not isinstance(model, torch.nn.Module):
        raise InvalidInput(f"cannot place {type(model).__name__}: give a zoo name "
                           f"(edgeswarm models) or a torch.nn.Module")
    if not example_inputs:
        raise InvalidInput("a torch module needs example_inputs (batch-first tensors)")
    return Model(type(model).__name__, model.eval(), tuple(example_inputs))


class Cluster:
    """A cluster of edgeswarm agents, commanded through one coordinator."""

    def __init__(self, coordinator: Coordinator, *, data_host: str = "127.0.0.1",
                 artifacts_dir: Path | None = None) -> None:
        self.coordinator = coordinator
        self.data_host = data_host
        self._dir = artifacts_dir or Path(tempfile.mkdtemp(prefix="edgeswarm-artifacts-"))
        self._server: ArtifactServer | None = None
        self._measured: dict[str, LinkSpec] = {}
        self._deployments: list[Deployment] = []

    # -- finding the cluster ---------------------------------------------------------
    @classmethod
    def connect(cls, broker: str, cluster: str = "default", key: bytes | str | Path | None = None,
                *, expect: int | None = None, timeout_s: float = 15.0,
                data_host: str = "127.0.0.1", **coordinator_options: Any) -> Cluster:
        """Join ``cluster`` on the MQTT ``broker``; with ``expect``, wait for that many
        devices to be online. ``key``: the cluster key (bytes) or its file (default
        ``$EDGESWARM_KEY_FILE`` or ``~/.config/edgeswarm/cluster.key``)."""
        coordinator = Coordinator(broker, cluster, _key(key), data_host=data_host,
                                  **coordinator_options)
        coordinator.start()
        try:
            if expect:
                coordinator.wait_for(expect, timeout_s)
        except BaseException:
            coordinator.stop()
            raise
        return cls(coordinator, data_host=data_host)

    @classmethod
    def discover(cls, cluster: str = "default", key: bytes | str | Path | None = None, *,
                 expect: int | None = None, timeout_s: float = 15.0,
                 interfaces: Sequence[str] | None = None,
                 data_host: str = "127.0.0.1") -> Cluster:
        """Find ``cluster``'s broker through zeroconf, then :meth:`connect`."""
        from edgeswarm.device_agent.discovery import browse

        _, brokers = browse(cluster, timeout_s=timeout_s, interfaces=interfaces,
                            expect_brokers=1)
        if not brokers:
            raise InvalidInput(f"no broker of cluster {cluster!r} answered through zeroconf "
                               f"within {timeout_s:.0f} s; is an agent with --embedded-broker "
                               f"(or `edgeswarm testbed`) running? Or use Cluster.connect")
        return cls.connect(brokers[0], cluster, key, expect=expect, timeout_s=timeout_s,
                           data_host=data_host)

    def close(self) -> None:
        """Tear down this cluster object's deployments and disconnect."""
        for dep in list(self._deployments):
            dep.close()
        if self._server is not None:
            self._server.stop()
        self.coordinator.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what is there ---------------------------------------------------------------
    @property
    def devices(self) -> list[DeviceState]:
        """The online devices, by id."""
        return sorted(self.coordinator.devices(), key=lambda s: s.device.id)

    def topology(self, without: Sequence[str] = ()) -> Topology:
        """The planner's view: devices (measured profiles) and links (emulated or measured)."""
        states = [s for s in self.devices if s.device.id not in without]
        if not states:
            raise PlacementInfeasible(f"cluster {self.coordinator.cluster!r} has no online "
                                      f"device to place on")
        devices = tuple(Device(DeviceId(s.device.id), s.device.flops, s.device.memory_bytes,
                               tuple(s.device.runtimes)) for s in states)
        links = []
        for a in states:
            for b in states:
                if a is not b:
                    spec = self._link(a, b)
                    links.append(Link(DeviceId(a.device.id), DeviceId(b.device.id),
                                      spec.bandwidth_Bps, spec.latency_s))
        return Topology(devices, tuple(links))

    def link_to(self, state: DeviceState) -> LinkSpec:
        """The link between the coordinator and a device: the real path its data probe
        measures, plus the emulated shape where the device emulates one."""
        shape = state.links.get(COORDINATOR) or state.links.get("*")
        return _plus(self._probed(state), shape)

    def _link(self, a: DeviceState, b: DeviceState) -> LinkSpec:
        # the real path: both ends' measured links to the coordinator bound it
        la, lb = self._probed(a), self._probed(b)
        real = LinkSpec(min(la.bandwidth_Bps, lb.bandwidth_Bps), max(la.latency_s, lb.latency_s))
        return _plus(real, a.links.get(b.device.id) or a.links.get("*"))

    def _probed(self, state: DeviceState) -> LinkSpec:
        """The measured link to a device (once per device): the best of
        :data:`PROBES` probes, so that a probe slowed by other work on either end does not
        stand for the link."""
        device = state.device.id
        if device not in self._measured:
            probes = [self.coordinator.measure_link(device, nbytes=PROBE_BYTES)
                      for _ in range(PROBES)]
            self._measured[device] = LinkSpec(max(p.bandwidth_Bps for p in probes),
                                              min(p.latency_s for p in probes))
        return self._measured[device]

    def link_shapes(self, devices: Sequence[str]) -> dict[str, LinkShape]:
        """Manifest ``links`` for the emulated links among ``devices`` and the coordinator."""
        states = {s.device.id: s for s in self.devices if s.device.id in devices}
        out: dict[str, LinkShape] = {}
        for a, sa in states.items():
            for b in [*states, COORDINATOR]:
                if b != a:
                    shape = sa.links.get(b) or sa.links.get("*")
                    if shape is not None:
                        out[f"{a}->{b}"] = shape
                        if b == COORDINATOR:
                            out[f"{COORDINATOR}->{a}"] = shape
        return out

    # -- planning and deploying ------------------------------------------------------
    def place(self, model: Any, example_inputs: Sequence[Any] | None = None,
              policy: str = "gnn", budget: int | None = None,
              codecs: Sequence[str] | None = None, tp: bool = False,
              runtime: str | None = None) -> Plan:
        """Plan ``model`` (a zoo name or an ``nn.Module``) on the devices online now.

        ``codecs``: feature codecs the plan may put on cut edges (``fp16``, ``int8``,
        ``learned[:β]``), measured on the model's own activations first (see
        :mod:`edgeswarm.codec_plans`); None: layer cuts only. ``tp``: run a zoo
        transformer (minilm, smollm2) tensor-parallel on the group of fastest devices the
        simulator predicts best (see :mod:`edgeswarm.tp_plans`); ``policy`` is not used.
        ``runtime="snn"``: the whole model converted to a spiking network on the one device
        that runs it best (spiking hardware first; see :mod:`edgeswarm.snn_plans`)."""
        from edgeswarm.placement.policies import place, solve
        from edgeswarm.placement.problem import Problem

        m = prepare(model, example_inputs)
        if runtime == "snn":
            from edgeswarm.snn_plans import place_snn

            if tp or codecs:
                raise InvalidInput("runtime 'snn' runs a whole model on one device: no "
                                   "tensor-parallel group, no codecs")
            return place_snn(m, self.topology(), policy)
        if tp:
            from edgeswarm.models.tp.shards import max_members
            from edgeswarm.tp_plans import place_group

            if codecs:
                raise InvalidInput("a tensor-parallel plan has no cut edges: pass tp=True or "
                                   "codecs, not both")
            return place_group(m.graph, self.topology(), max_members(m.module))
        if not codecs:
            opts = Options(budget=budget, tp=DEPLOYABLE.tp, codecs=DEPLOYABLE.codecs)
            return place(m.graph, self.topology(), policy, opts)
        if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
            raise InvalidInput(f"{model}: feature codecs are trained on a torch model's "
                               f"activations; place the torch module (or its zoo name), or "
                               f"place the ONNX file without codecs")
        from edgeswarm.codec_plans import measured

        table = measured(m, codecs).table
        opts = Options(budget=budget, tp=DEPLOYABLE.tp, codecs=True)
        return solve(Problem(m.graph, self.topology(), table), policy, opts)

    def deploy(self, model: Any, plan: Plan | None = None,
               example_inputs: Sequence[Any] | None = None, *, runtime: str = "onnx",
               policy: str = "gnn", timeout_s: float = 60.0) -> Deployment:
        """Export ``model``'s stages for ``plan`` (made with ``policy`` when None) and start
        them on the devices. The deployment re-plans and redeploys by itself when a device
        it uses is lost."""
        from edgeswarm.deployment import Deployment

        m = prepare(model, example_inputs)
        dep = Deployment(self, m, plan, runtime=runtime, policy=policy, timeout_s=timeout_s)
        self._deployments.append(dep)
        return dep

    def _forget(self, dep: Deployment) -> None:
        if dep in self._deployments:
            self._deployments.remove(dep)

    def artifact_server(self) -> ArtifactServer:
        if self._server is None:
            self._server = ArtifactServer(self._dir, host=self.data_host).start()
        return self._server


def _plus(real: LinkSpec, shape: LinkShape | None) -> LinkSpec:
    """``real`` with an emulated ``shape`` on top: latencies add, and so do seconds per byte."""
    if shape is None:
        return real
    return LinkSpec(1.0 / (1.0 / shape.bandwidth_Bps + 1.0 / real.bandwidth_Bps),
                    shape.latency_s + real.latency_s)


def _key(key: bytes | str | Path | None) -> bytes:
    from edgeswarm.device_agent import keys

    if isinstance(key, bytes):
        return key
    if key is None:
        from edgeswarm.cli_agent import default_key_file

        key = default_key_file()
    return keys.read(key)
