"""A model running across the cluster, kept running while devices come and go.

A :class:`Deployment` owns one pipeline: the coordinator is rank 0, sends each request's
inputs to the first stage and reads the outputs from the last. Every generation (a plan,
its exported stages, a manifest, a gloo group) is recorded with its predicted latency
(the simulator on the profiles the agents measured, plus the coordinator's own two
transfers) and the latencies measured by :meth:`run`.

When a device it uses is lost (kill -9, network gone, clean stop), the coordinator's
membership callback marks the deployment stale and recovery starts at once in the
background: :func:`~edgeswarm.placement.replan.replan` on the devices left (few tasks
move), only the stages that changed are exported, and the next generation is deployed.
A request that was in flight when the device died fails on its gloo operation (the
stages around a dead one leave their group, so the failure reaches rank 0 at once), waits
for the membership to name the lost device (at most ``loss_wait_s``) and for the recovery,
and is sent again; :meth:`run` returns only a result computed by a complete
pipeline, and raises only after ``attempts`` tries.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeswarm.device_agent import membership as ms
from edgeswarm.device_agent.manifest import COORDINATOR, Manifest
from edgeswarm.placement.codecs import DEFAULT_CODECS, CodecSpec
from edgeswarm.placement.errors import DeviceLost, Error, InvalidInput
from edgeswarm.placement.plan import Plan
from edgeswarm.placement.simulator import simulate
from edgeswarm.shards import ShardCache, manifest_for
from edgeswarm.tp_plans import GroupShards, group_manifest, group_of, group_plan, place_group

if TYPE_CHECKING:
    from edgeswarm.cluster import Cluster, Model
    from edgeswarm.models.partition import Partition

log = logging.getLogger("edgeswarm.sdk")


@dataclass
class Generation:
    """One deployed generation: what ran where, why, and how fast it was predicted to be.

    Where its start-up went: ``plan_s`` (placing or re-planning; 0 for a plan given),
    ``export_s`` (cutting the model and exporting the stages not cached yet), ``deploy_s``
    (the devices fetching, loading and joining); ``ready_at`` is ``time.monotonic()`` when
    it could take requests.
    """

    number: int
    plan: Plan
    devices: tuple[str, ...]
    reason: str
    deploy_s: float
    predicted_s: float
    tasks_moved: int = 0
    measured_s: list[float] = field(default_factory=list)
    plan_s: float = 0.0
    export_s: float = 0.0
    ready_at: float = 0.0

    @property
    def measured_median_s(self) -> float:
        return float(np.median(self.measured_s)) if self.measured_s else float("nan")


class Deployment:
    """A model deployed on a :class:`~edgeswarm.cluster.Cluster` (see the module doc)."""

    def __init__(self, cluster: Cluster, model: Model, plan: Plan | None, *,
                 runtime: str = "onnx", policy: str = "gnn", timeout_s: float = 60.0,
                 attempts: int = 4, loss_wait_s: float = 2.0) -> None:
        self.cluster = cluster
        self.model = model
        self.runtime = runtime
        self.policy = policy
        self.timeout_s = timeout_s
        self.attempts = attempts
        #: after a failed request, how long to wait for the membership to name the device
        #: that was lost before re-planning (a dead peer breaks the gloo connection a few
        #: milliseconds before the broker publishes its last will)
        self.loss_wait_s = loss_wait_s
        self.id = f"{model.name}-{secrets.token_hex(3)}"
        self.generations: list[Generation] = []
        self.retries = 0
        self._lock = threading.RLock()
        self._stale = ""
        self._lost = threading.Event()   # a device of the current generation is gone
        self._closed = False
        self._recovering: threading.Thread | None = None
        self._manifest: Manifest | None = None
        self._partition: Partition | None = None
        self._group_shards: GroupShards | None = None
        self._out_bytes: int | None = None
        calib = model.calibration if runtime.endswith("int8") else None
        self._cache = ShardCache(cluster.artifact_server(), model.example_inputs, calib)
        self._examples = [_numpy(x) for x in model.example_inputs]
        cluster.coordinator.on_change(self._on_change)
        with self._lock:
            t0 = time.perf_counter()
            if plan is None:
                plan = cluster.place(model, policy=policy, runtime=runtime)
            #: the codecs a re-plan may use: those of the plan the user deployed
            self._codec_names = sorted(set(plan.codecs.values()) - {"none"})
            self._start(plan, "initial plan", plan_s=time.perf_counter() - t0)
        # load the re-planning policy now (the GNN's imports take ~1 s), not when a device
        # is lost and requests wait for the recovery
        from edgeswarm.placement.policies import policy as load_policy

        try:
            load_policy(policy)
        except Error as exc:
            log.warning("deployment %s will not be able to re-plan: %s", self.id, exc)

    # -- public ----------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        return self.generations[-1].plan

    @property
    def generation(self) -> int:
        return self.generations[-1].number

    @property
    def predicted_latency_s(self) -> float:
        return self.generations[-1].predicted_s

    @property
    def devices(self) -> tuple[str, ...]:
        return self.generations[-1].devices

    def run(self, *inputs: Any) -> Any:
        """One request: the model's output for ``inputs`` (numpy arrays or torch tensors,
        batch-first; torch in, torch out). Retried on the next generation if a device is
        lost on the way."""
        arrays = self._check([_numpy(x) for x in inputs])
        as_torch = any(type(x).__module__.startswith("torch") for x in inputs)
        last: Exception | None = None
        for attempt in range(self.attempts):
            with self._lock:
                if self._closed:
                    raise InvalidInput(f"deployment {self.id} is closed")
                try:
                    if self._stale:
                        self._await_loss()
                        self._recover()
                    t0 = time.perf_counter()
                    outs = self.cluster.coordinator.infer(self.id, arrays)
                    self.generations[-1].measured_s.append(time.perf_counter() - t0)
                except (DeviceLost, Error) as exc:
                    if isinstance(exc, InvalidInput):
                        raise
                    last = exc
                    self.retries += attempt == 0
                    self._stale = self._stale or f"request failed: {exc}"
                    log.warning("deployment %s generation %d: %s; re-planning", self.id,
                                self.generation, exc)
                    continue
            assert self._partition is not None
            result = self._partition.assemble(outs)
            return _torch(result) if as_torch else result
        raise DeviceLost(f"deployment {self.id}: request failed {self.attempts} times; last "
                         f"error: {last}")

    async def arun(self, *inputs: Any) -> Any:
        """:meth:`run` without blocking the event loop."""
        return await asyncio.to_thread(self.run, *inputs)

    def close(self) -> None:
        """Stop the pipeline and release the devices."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self.cluster.coordinator.teardown(self.id, timeout_s=5.0)
            except Error as exc:
                log.warning("deployment %s: teardown incomplete: %s", self.id, exc)
        self.cluster._forget(self)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- generations -----------------------------------------------------------------
    def _start(self, plan: Plan, reason: str, moved: int = 0, plan_s: float = 0.0) -> None:
        from edgeswarm.models.partition import partition

        m = self.model
        t0 = time.perf_counter()
        group = group_of(plan)
        # a tensor-parallel group runs the whole model: the partition of it on the group's
        # lead tells how outputs assemble (see edgeswarm.tp_plans)
        part = partition(m.module, m.example_inputs,
                         plan if group is None else group_plan(m.graph, group[:1]), m.trace())
        codecs, table = None, DEFAULT_CODECS
        if plan.codecs:  # encoders, decoders and tuned stages: see edgeswarm.codec_plans
            from edgeswarm.codec_plans import measured, shipping

            known = measured(m, plan.codecs.values())
            ship = shipping(part, plan, m.trace(), known, self.cluster.artifact_server())
            part, codecs, table = ship.partition, ship.codecs, known.table
        devices = group or tuple(dict.fromkeys(part.devices))
        number = (self.generations[-1].number + 1) if self.generations else 1
        coord = self.cluster.coordinator
        common: dict[str, Any] = dict(deployment=self.id, generation=number, model=m.name,
                                      store=coord.store_endpoint(),
                                      links=self.cluster.link_shapes(devices),
                                      timeout_s=min(self.timeout_s, 30.0))
        if group is not None:
            if self._group_shards is None:
                self._group_shards = GroupShards(self.cluster.artifact_server(), m.module)
            manifest = group_manifest(self._group_shards, self.cluster.topology(), group,
                                      **common)
            export_s = time.perf_counter() - t0
        elif self.runtime == "snn":  # the whole model, converted: see edgeswarm.snn_plans
            from edgeswarm.snn_plans import compiled, device_of

            device = device_of(plan)
            runtimes = self._runtimes(devices)
            exe = compiled(m).exe
            assert exe.path is not None
            artifacts = [self.cluster.artifact_server().add(exe.path,
                                                            name=f"{device}-{exe.path.name}")]
            export_s = time.perf_counter() - t0
            manifest = manifest_for(part, artifacts, runtimes, **common)
        else:
            runtimes = self._runtimes(devices)
            artifacts = self._cache.artifacts(part, runtimes)
            export_s = time.perf_counter() - t0
            manifest = manifest_for(part, artifacts, runtimes, codecs=codecs, **common)
        t0 = time.perf_counter()
        coord.deploy(manifest, timeout_s=self.timeout_s)
        deploy_s = time.perf_counter() - t0
        old = self._manifest
        self._manifest, self._partition = manifest, part
        self._lost.clear()
        self.generations.append(Generation(number, plan, devices, reason, deploy_s,
                                           self._predict(plan, part, table), moved,
                                           plan_s=plan_s,
                                           export_s=export_s, ready_at=time.monotonic()))
        log.info("deployment %s generation %d on %s (%s) in %.2f s", self.id, number,
                 ", ".join(devices), reason, deploy_s)
        if old is not None:  # devices of the old generation that the new one does not use
            online = {s.device.id for s in self.cluster.devices}
            gone = [d for d in old.ranks if d != COORDINATOR and d not in manifest.ranks
                    and d in online]
            if gone:
                try:
                    coord.teardown(self.id, devices=gone, timeout_s=2.0)
                except Error as exc:
                    log.debug("teardown of %s on %s: %s", self.id, gone, exc)

    def _recover(self) -> None:
        """Re-plan on the devices online now and deploy the next generation."""
        from edgeswarm.cluster import DEPLOYABLE
        from edgeswarm.placement.replan import replan, tasks_moved

        why, self._stale = self._stale, ""
        t0 = time.perf_counter()
        members = self.cluster.coordinator.membership.members
        for d in self.devices:  # name the devices this generation loses, however noticed
            member = members.get(d)
            status = member.status if member is not None else "lost"
            if status != "online" and f"device {d} " not in f"{why} ":
                why = f"{why}; device {d} {status}"
        topology = self.cluster.topology()
        if self.runtime == "snn":  # the best device left that runs it
            from edgeswarm.snn_plans import place_snn

            plan = place_snn(self.model, topology, self.policy)
            self._start(plan, why, tasks_moved(self.plan, plan), time.perf_counter() - t0)
            return
        if group_of(self.plan) is not None:  # the best group among the devices left
            from edgeswarm.models.tp.shards import max_members

            plan = place_group(self.model.graph, topology, max_members(self.model.module))
            self._start(plan, why, tasks_moved(self.plan, plan), time.perf_counter() - t0)
            return
        # layer cuts only: this deployment cannot run tensor-parallel groups, which
        # replan's default options may choose. Codecs stay possible where the first plan
        # had them, costed by the same measurements (see edgeswarm.codec_plans).
        opts, table = DEPLOYABLE, None
        if self._codec_names:
            from edgeswarm.codec_plans import measured

            table = measured(self.model, self._codec_names).table
            opts = replace(DEPLOYABLE, codecs=True)
        result = replan(self.plan, self.model.graph, topology, policy=self.policy,
                        opts=opts, codec_table=table)
        self._start(result.plan, why, result.tasks_moved, time.perf_counter() - t0)

    def _await_loss(self) -> None:
        """After a failed request: give the membership up to ``loss_wait_s`` to report the
        device that broke the pipeline, so that the re-plan leaves it out. Returns at once
        when a device of this generation is already gone."""
        if self._manifest is None:
            return
        used = [d for d in self._manifest.ranks if d != COORDINATOR]
        online = {s.device.id for s in self.cluster.devices}
        if all(d in online for d in used):
            self._lost.wait(self.loss_wait_s)

    def _on_change(self, _m: ms.Membership, event: Any) -> None:
        if self._closed or self._manifest is None:
            return
        device = getattr(event, "device", None)
        if isinstance(event, (ms.DeviceLost, ms.DeviceLeft)) and device in self._manifest.ranks:
            how = "lost" if isinstance(event, ms.DeviceLost) else "left"
            self._stale = f"device {device} {how}"
            self._lost.set()
            t = threading.Thread(target=self._recover_now, daemon=True,
                                 name=f"edgeswarm-recover-{self.id}")
            t.start()

    def _recover_now(self) -> None:
        with self._lock:
            if self._stale and not self._closed:
                try:
                    self._recover()
                except Error as exc:  # the next request tries again
                    log.warning("deployment %s: recovery failed: %s", self.id, exc)
                    self._stale = self._stale or f"recovery failed: {exc}"

    # -- helpers ---------------------------------------------------------------------
    def _runtimes(self, devices: Sequence[str]) -> dict[str, str]:
        states = {s.device.id: s for s in self.cluster.devices}
        out = {}
        for d in devices:
            have = states[d].device.runtimes if d in states else []
            if self.runtime in have:
                out[d] = self.runtime
            elif self.runtime == "snn":  # not a format choice: the model itself differs
                raise InvalidInput(f"device {d!r} does not run 'snn' (it has {have}): plan "
                                   f"with cluster.place(model, runtime='snn')")
            elif "onnx" in have:
                out[d] = "onnx"
            else:
                raise InvalidInput(f"device {d!r} runs none of {self.runtime!r}, 'onnx' "
                                   f"(it has {have}); install edgeswarm[onnx] there")
        return out

    def _predict(self, plan: Plan, part: Partition,
                 table: Mapping[str, CodecSpec] = DEFAULT_CODECS) -> float:
        """The simulator's latency for the plan (its codecs costed by ``table``), plus
        sending the inputs to the first stage and the outputs back (the coordinator is not
        a device of the plan)."""
        topology = self.cluster.topology()
        if self.runtime == "snn":
            from edgeswarm.snn_plans import device_of, seconds_on

            makespan = seconds_on(topology, device_of(plan), self.model)
        else:
            makespan = simulate(self.model.graph, topology, plan, table).makespan
        states = {s.device.id: s for s in self.cluster.devices}
        first, last = part.stages[0].device, part.stages[-1].device
        if self._out_bytes is None:  # the model's outputs: the same for every plan
            self._out_bytes = sum(o.nbytes for o in self._example_outputs(part))
        out_bytes = self._out_bytes
        total = makespan
        for device, nbytes in ((first, sum(x.nbytes for x in self._examples)),
                               (last, out_bytes)):
            if device in states:
                link = self.cluster.link_to(states[device])
                total += link.latency_s + nbytes / link.bandwidth_Bps
        return total

    def _example_outputs(self, part: Partition) -> list[np.ndarray]:
        import torch

        inputs = part.stage_inputs(*self.model.example_inputs)
        with torch.inference_mode():
            outs = part.stages[-1].module(*inputs[-1])
        return [_numpy(o) for o in outs]

    def _check(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Refuse inputs the stages cannot take before they reach a device."""
        if len(arrays) != len(self._examples):
            raise InvalidInput(f"{self.model.name} takes {len(self._examples)} input(s), "
                               f"got {len(arrays)}")
        for i, (a, e) in enumerate(zip(arrays, self._examples, strict=True)):
            if a.dtype != e.dtype or a.shape[1:] != e.shape[1:] or a.ndim != e.ndim:
                raise InvalidInput(f"input {i} of {self.model.name}: expected dtype {e.dtype} "
                                   f"and shape (batch, {', '.join(map(str, e.shape[1:]))}), "
                                   f"got {a.dtype} {tuple(a.shape)}")
        return arrays


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def _torch(value: Any) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_torch(v) for v in value)
    return value
