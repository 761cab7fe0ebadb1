"""Churn on the real thing: agent processes on loopback, Mosquitto, zeroconf discovery, gloo
pipelines; devices killed with SIGKILL and joined while a client sends requests back to
back. Every request must come back correct, re-planned by the deployment on its own."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from edgeswarm.cluster import Cluster, prepare
from edgeswarm.deployment import Deployment
from edgeswarm.device_agent.broker import Mosquitto
from edgeswarm.device_agent.coordinator import DeployFailed
from edgeswarm.device_agent.manifest import Artifact, Manifest, Shard
from edgeswarm.models import zoo
from edgeswarm.placement.errors import Error
from edgeswarm.placement.plan import Plan
from edgeswarm.testbed import Testbed, TestbedConfig
from edgeswarm.testbed_profile import load_profile

LOOPBACK = "127.0.0.1"
NAMES = ("dev-1", "dev-2", "dev-3")
WAIT_S = 20.0   # any step (a recovery included) must be done well within this


def three_agents(broker: str | None) -> TestbedConfig:
    return TestbedConfig(profile=load_profile("uniform", len(NAMES), link="1gbit:1ms"),
                         cluster=f"e2e-{secrets.token_hex(3)}", broker=broker)


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    """Three agent processes on Mosquitto."""
    with Mosquitto() as broker, Testbed(three_agents(broker.uri)) as tb:
        yield tb


@pytest.fixture
def embedded_testbed() -> Iterator[Testbed]:
    """Three agent processes on the embedded broker (amqtt, in this process)."""
    with Testbed(three_agents(None)) as tb:
        yield tb


class Stream:
    """A client thread sending one request after another, each result checked."""

    def __init__(self, dep: Deployment, x: torch.Tensor, want: np.ndarray) -> None:
        self.dep, self.x, self.want = dep, x, want
        self.results: list[str] = []
        self.cv = threading.Condition()
        self.started = threading.Event()   # set as each request starts
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.started.set()
            try:
                y = self.dep.run(self.x).numpy()
                outcome = "ok" if np.allclose(y, self.want, atol=1e-5) else "wrong"
            except Error as exc:
                outcome = f"raised: {exc}"
            with self.cv:
                self.results.append(outcome)
                self.cv.notify_all()

    def wait_for(self, n: int, what: str) -> None:
        """Until ``n`` more results have come back."""
        with self.cv:
            target = len(self.results) + n
            if not self.cv.wait_for(lambda: len(self.results) >= target, WAIT_S):
                pytest.fail(f"{what}: {len(self.results)} of {target} results after "
                            f"{WAIT_S} s (generations: {self.dep.generation})")

    def kill_in_flight(self, tb: Testbed, name: str) -> None:
        """SIGKILL ``name`` just after a request has started."""
        self.started.clear()
        assert self.started.wait(WAIT_S), "no request started"
        tb.kill(name)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(WAIT_S * 3)
        assert not self._thread.is_alive(), "the client's last request never ended"
        return self.results


def three_way(tasks: list[str]) -> Plan:
    return Plan({t: (NAMES[min(2, 3 * i // len(tasks))],) for i, t in enumerate(tasks)})


@pytest.mark.slow
def test_every_request_comes_back_correct_through_kill_9_and_a_join(testbed: Testbed) -> None:
    z = zoo.load("digits-cnn")
    x = z.heldout.inputs[0][:16]
    with torch.inference_mode():
        want = z.module(x).numpy()
    with Cluster.discover(testbed.cluster, testbed.key, expect=len(NAMES),
                          interfaces=[LOOPBACK], timeout_s=30) as cluster:
        model = prepare("digits-cnn")
        with cluster.deploy(model, three_way([t.id for t in model.graph.tasks])) as dep:
            assert dep.devices == NAMES
            stream = Stream(dep, x, want)
            try:
                stream.wait_for(5, "before any churn")
                stream.kill_in_flight(testbed, "dev-2")        # the middle of the pipeline
                stream.wait_for(5, "after killing dev-2")
                testbed.join("dev-4")
                stream.wait_for(5, "after dev-4 joined")
                second = dep.devices[0]
                stream.kill_in_flight(testbed, second)         # a device of generation 2
                stream.wait_for(5, f"after killing {second}")
            finally:
                results = stream.stop()
            generations = list(dep.generations)
    assert results and all(r == "ok" for r in results), [r for r in results if r != "ok"]
    assert [g.number for g in generations][:3] == [1, 2, 3]
    assert "dev-2" not in generations[1].devices
    assert "device dev-2 lost" in generations[1].reason
    assert second not in generations[2].devices and "lost" in generations[2].reason
    assert all(len(g.measured_s) > 0 for g in generations[:3])   # each one served


@pytest.mark.slow
def test_a_deploy_to_a_device_that_died_fails_at_once_naming_it(
        embedded_testbed: Testbed) -> None:
    testbed = embedded_testbed
    coordinator = testbed.coordinator()
    coordinator.wait_for(len(NAMES), 30)
    lost = threading.Event()
    coordinator.on_change(lambda m, _e: lost.set() if m.members["dev-3"].status == "lost"
                          else None)
    testbed.kill("dev-3")
    assert lost.wait(WAIT_S), "dev-3 was not reported lost"
    artifact = Artifact(name="stage.onnx", sha256="0" * 64, size=1,
                        url="http://127.0.0.1:9/stage.onnx")
    manifest = Manifest(deployment="gone", generation=1, model="m", store_host=LOOPBACK,
                        store_port=9, world_size=2, ranks={"coordinator": 0, "dev-3": 1},
                        shards=[Shard(id="s", device="dev-3", runtime="onnx",
                                      artifact=artifact, recv_from=[0], send_to=[0])])
    # without the membership check this waits out the 300 s and says "no answer"
    with pytest.raises(DeployFailed, match="dev-3 went offline before answering") as info:
        coordinator.deploy(manifest, timeout_s=300, join=False)
    assert info.value.missing == ["dev-3"]
