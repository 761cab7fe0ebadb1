"""The coordinator against real brokers: membership from retained states and heartbeats, the
last will told apart from a clean stop by its signed timestamp, signed pings to a real
(in-process) agent, forged states refused, and waiting with a deadline."""

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeswarm.device_agent import membership as ms
from edgeswarm.device_agent import protocol, topics
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.control import ControlClient
from edgeswarm.device_agent.coordinator import Coordinator, WaitTimeout
from edgeswarm.placement.errors import DeviceLost

KEY = bytes(range(32))
CLUSTER = "c1"


def profile(device: str) -> protocol.DeviceProfile:
    return protocol.DeviceProfile(id=device, flops=1e9, int8_ops=1e9, memory_bytes=1 << 30,
                                  runtimes=["onnx"], cores=1, speed=1.0, platform="test")


def state(device: str, status: str) -> protocol.DeviceState:
    return protocol.DeviceState(status=status, device=profile(device),  # type: ignore[arg-type]
                                agent_version="0", data_host="127.0.0.1", data_port=1,
                                heartbeat_s=0.2)


class FakeDevice:
    """A bare control client that speaks for a device: states and heartbeats by hand."""

    def __init__(self, uri: str, device: str, key: bytes = KEY, clock: object = time.time) -> None:
        self.device = device
        self.client = ControlClient(uri, f"fake-{device}", key=key, sender=device,
                                    clock=clock)  # type: ignore[arg-type]
        self.client.start()

    def publish_state(self, status: str) -> None:
        self.client.publish(topics.state(CLUSTER, self.device), state(self.device, status),
                            retain=True, wait=True)

    def beat(self, seq: int) -> None:
        self.client.publish(topics.heartbeat(CLUSTER, self.device), protocol.Heartbeat(seq=seq))


@pytest.fixture
def coordinator(mosquitto) -> Iterator[Coordinator]:
    with Coordinator(mosquitto.uri, CLUSTER, KEY, heartbeat_timeout_s=0.6) as c:
        yield c


@pytest.fixture
def fakes() -> Iterator[list[FakeDevice]]:
    made: list[FakeDevice] = []
    yield made
    for f in made:
        f.client.stop()


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s")
        time.sleep(0.01)


def status(c: Coordinator, device: str) -> str | None:
    member = c.membership.members.get(device)
    return None if member is None else member.status


def test_states_make_devices_online_and_a_clean_offline_makes_them_left(
        coordinator: Coordinator, mosquitto, fakes: list[FakeDevice], no_leaked_threads) -> None:
    changes: queue.Queue[ms.Event] = queue.Queue()
    coordinator.on_change(lambda m, e: changes.put(e))
    dev = FakeDevice(mosquitto.uri, "d1")
    fakes.append(dev)
    dev.publish_state("online")
    assert [s.device.id for s in coordinator.wait_for(1, 5)] == ["d1"]
    assert isinstance(changes.get(timeout=5), ms.DeviceSeen)
    dev.publish_state("offline")  # sealed now: after the online state
    event = changes.get(timeout=5)
    assert isinstance(event, ms.DeviceLeft) and event.device == "d1"
    assert status(coordinator, "d1") == "left" and coordinator.devices() == []
    dev.client.stop()


def test_an_offline_state_sealed_before_the_online_one_is_a_last_will(
        coordinator: Coordinator, mosquitto, fakes: list[FakeDevice]) -> None:
    lost: queue.Queue[ms.Event] = queue.Queue()
    coordinator.on_change(lambda m, e: lost.put(e) if isinstance(e, ms.DeviceLost) else None)
    now = [1000.0 + time.time()]
    dev = FakeDevice(mosquitto.uri, "d2", clock=lambda: now[0])
    fakes.append(dev)
    will = dev.client.seal(topics.state(CLUSTER, "d2"), state("d2", "offline"))  # at connect
    now[0] += 1.0
    dev.publish_state("online")
    coordinator.wait_for(1, 5)
    dev.client.publish_raw(topics.state(CLUSTER, "d2"), will, retain=True)
    event = lost.get(timeout=5)
    assert isinstance(event, ms.DeviceLost) and "last will" in event.why


def test_a_device_whose_heartbeats_stop_is_lost_and_comes_back_when_they_resume(
        coordinator: Coordinator, mosquitto, fakes: list[FakeDevice]) -> None:
    dev = FakeDevice(mosquitto.uri, "hung")
    fakes.append(dev)
    dev.publish_state("online")
    coordinator.wait_for(1, 5)
    t0 = time.monotonic()
    wait_until(lambda: status(coordinator, "hung") == "lost", 5)
    assert 0.5 < time.monotonic() - t0 < 3.0  # timeout 0.6 s, checked every 0.1 s
    dev.beat(1)
    wait_until(lambda: status(coordinator, "hung") == "online", 5)


def test_forged_states_are_refused_and_counted(
        coordinator: Coordinator, mosquitto, fakes: list[FakeDevice]) -> None:
    forger = FakeDevice(mosquitto.uri, "evil", key=b"\x01" * 32)
    fakes.append(forger)
    forger.publish_state("online")
    impostor = FakeDevice(mosquitto.uri, "other")  # right key, speaks for another device
    fakes.append(impostor)
    impostor.client.publish(topics.state(CLUSTER, "victim"), state("victim", "online"),
                            retain=True, wait=True)
    wait_until(lambda: coordinator.rejected["bad_signature"] >= 1
               and coordinator.rejected["wrong_sender"] >= 1)
    assert coordinator.devices() == []


def test_wait_for_says_how_many_came(coordinator: Coordinator) -> None:
    t0 = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"only 0 of 2 devices online in cluster 'c1'"):
        coordinator.wait_for(2, 0.3)
    assert time.monotonic() - t0 < 2


def test_a_ping_to_nobody_fails_within_its_timeout(coordinator: Coordinator) -> None:
    with pytest.raises(DeviceLost, match=r"'ghost' did not answer a ping within 0\.3 s"):
        coordinator.ping("ghost", timeout_s=0.3)


@pytest.mark.parametrize("broker", ["mosquitto", "embedded_broker"])
def test_signed_pings_to_a_real_agent(broker: str, request: pytest.FixtureRequest,
                                      tmp_path: Path) -> None:
    uri = request.getfixturevalue(broker).uri
    config = AgentConfig(name="pinged", cluster=CLUSTER, broker=uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path)
    agent = Agent(config, KEY)
    with Coordinator(uri, CLUSTER, KEY) as c:
        agent.start()
        try:
            states = c.wait_for(1, 10)
            assert states[0].device.id == "pinged" and states[0].data_port > 0
            rtts = [c.ping("pinged") for _ in range(20)]
            assert all(0 < r < 1.0 for r in rtts)
            assert sorted(rtts)[10] < 0.05  # TCP_NODELAY everywhere: no 40 ms stalls
            results: list[float] = []
            threads = [threading.Thread(target=lambda: results.append(c.ping("pinged")))
                       for _ in range(4)]  # concurrent pings are told apart by seq
            for t in threads:
                t.start()
            for t in threads:
                t.join(5)
            assert len(results) == 4
        finally:
            agent.stop()
        wait_until(lambda: status(c, "pinged") == "left")


def test_measure_link_through_the_agents_data_probe(mosquitto, tmp_path: Path) -> None:
    config = AgentConfig(name="probed", cluster=CLUSTER, broker=mosquitto.uri, advertise=False,
                         profile_s=0.03, artifacts_dir=tmp_path)
    agent = Agent(config, KEY)
    with Coordinator(mosquitto.uri, CLUSTER, KEY) as c:
        agent.start()
        try:
            c.wait_for(1, 10)
            link = c.measure_link("probed", nbytes=1 << 20)
            assert 0 < link.latency_s < 0.05
            assert link.bandwidth_Bps > 1e7  # loopback moves far more than 10 MB/s
        finally:
            agent.stop()
