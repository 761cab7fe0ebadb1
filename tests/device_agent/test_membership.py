"""The membership reducer: every transition by feeding events, time passed in."""

import pytest

from edgeswarm.device_agent import membership as ms
from edgeswarm.device_agent.protocol import DeviceProfile, DeviceState
from edgeswarm.placement.cluster import LinkSpec
from edgeswarm.placement.errors import InvalidInput


def state(device: str, status: str = "online", heartbeat_s: float = 0.5,
          flops: float = 1e9, deployments: list[str] | None = None) -> DeviceState:
    profile = DeviceProfile(id=device, flops=flops, int8_ops=2e9, memory_bytes=1 << 30,
                            runtimes=["onnx"], cores=2, speed=1.0, platform="test")
    return DeviceState(status=status, device=profile, agent_version="0.1.0",  # type: ignore[arg-type]
                       data_host="127.0.0.1", data_port=0, heartbeat_s=heartbeat_s,
                       deployments=deployments or [])


def fold(*events: ms.Event) -> ms.Membership:
    m = ms.Membership()
    for e in events:
        m = ms.apply(m, e)
    return m


def test_seen_devices_are_online_and_each_join_bumps_the_generation() -> None:
    m0 = ms.Membership()
    m1 = ms.apply(m0, ms.DeviceSeen("a", state("a"), 1.0))
    m2 = ms.apply(m1, ms.DeviceSeen("b", state("b"), 2.0))
    assert m0.generation == 0 and m1.generation == 1 and m2.generation == 2
    assert [s.device.id for s in ms.online(m2)] == ["a", "b"]
    assert m2.members["a"] == ms.Member(state("a"), 1.0, "online")
    assert m0.members == {}  # the old value is untouched


def test_a_state_update_of_an_online_device_keeps_the_generation() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 1.0))
    m2 = ms.apply(m, ms.DeviceSeen("a", state("a", deployments=["d1"]), 2.0))
    assert m2.generation == m.generation
    assert m2.members["a"].state.deployments == ["d1"]
    assert m2.members["a"].last_seen == 2.0


def test_left_and_lost_remove_a_device_from_the_online_set() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 1.0), ms.DeviceSeen("b", state("b"), 1.0))
    left = ms.apply(m, ms.DeviceLeft("a", 2.0))
    lost = ms.apply(left, ms.DeviceLost("b", 3.0, "last will"))
    assert left.members["a"].status == "left" and left.generation == m.generation + 1
    assert lost.members["b"].status == "lost" and lost.generation == m.generation + 2
    assert ms.online(lost) == []


def test_leaving_twice_or_an_unknown_device_changes_nothing() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 1.0), ms.DeviceLeft("a", 2.0))
    assert ms.apply(m, ms.DeviceLeft("a", 3.0)) is m
    assert ms.apply(m, ms.DeviceLost("a", 3.0, "will")) is m
    assert ms.apply(m, ms.DeviceLost("zz", 3.0, "will")) is m
    assert ms.apply(m, ms.HeartbeatSeen("zz", 3.0)) is m


def test_an_offline_state_counts_as_left() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 1.0), ms.DeviceSeen("a", state("a", "offline"), 2.0))
    assert m.members["a"].status == "left"
    assert m.generation == 2


def test_heartbeats_refresh_last_seen_but_never_go_back_in_time() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 1.0), ms.HeartbeatSeen("a", 5.0),
             ms.HeartbeatSeen("a", 4.0))
    assert m.members["a"].last_seen == 5.0
    assert m.generation == 1


def test_expire_reports_silent_devices_lost_once() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 0.0), ms.DeviceSeen("b", state("b"), 0.0),
             ms.HeartbeatSeen("b", 1.0))
    m2, lost = ms.expire(m, now=1.6, timeout_s=1.5)
    assert [e.device for e in lost] == ["a"]
    assert "no heartbeat for 1.60 s" in lost[0].why and lost[0].at == 1.6
    assert m2.members["a"].status == "lost" and m2.members["b"].status == "online"
    assert m2.generation == m.generation + 1
    m3, again = ms.expire(m2, now=1.7, timeout_s=1.5)
    assert again == [] and m3 is m2


def test_expire_at_exactly_the_timeout_keeps_the_device() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 0.0))
    _, lost = ms.expire(m, now=1.5, timeout_s=1.5)
    assert lost == []


def test_a_slow_heartbeat_period_stretches_the_timeout() -> None:
    m = fold(ms.DeviceSeen("slow", state("slow", heartbeat_s=2.0), 0.0))
    _, lost = ms.expire(m, now=5.9, timeout_s=1.5)  # 3 x 2.0 s applies, not 1.5 s
    assert lost == []
    _, lost = ms.expire(m, now=6.1, timeout_s=1.5)
    assert [e.device for e in lost] == ["slow"]


def test_a_heartbeat_revives_a_device_lost_to_silence_but_not_one_that_left() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 0.0), ms.DeviceSeen("b", state("b"), 1.0))
    m, lost = ms.expire(m, now=2.0, timeout_s=1.5)
    assert [e.device for e in lost] == ["a"]
    m = ms.apply(m, ms.DeviceLeft("b", 2.0))
    gen = m.generation
    m = ms.apply(m, ms.HeartbeatSeen("a", 2.5))
    assert m.members["a"].status == "online" and m.generation == gen + 1
    assert ms.apply(m, ms.HeartbeatSeen("b", 2.5)).members["b"].status == "left"


def test_a_device_that_comes_back_is_online_in_a_new_generation() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 0.0), ms.DeviceLost("a", 1.0, "last will"),
             ms.DeviceSeen("a", state("a"), 2.0))
    assert m.members["a"].status == "online"
    assert m.generation == 3


def test_to_cluster_holds_the_online_devices_with_the_default_link() -> None:
    m = fold(ms.DeviceSeen("b", state("b", flops=2e9), 0.0),
             ms.DeviceSeen("a", state("a"), 0.0), ms.DeviceSeen("c", state("c"), 0.0),
             ms.DeviceLeft("c", 1.0))
    link = LinkSpec(bandwidth_Bps=1e8, latency_s=1e-3)
    cluster = ms.to_cluster(m, link)
    assert cluster.ids == ["a", "b"]
    assert cluster.device("b").flops == 2e9 and cluster.device("a").runtimes == ("onnx",)
    assert cluster.link("a", "b") == link


def test_to_cluster_of_nobody_says_what_to_do() -> None:
    with pytest.raises(InvalidInput, match="no device is online"):
        ms.to_cluster(ms.Membership(), LinkSpec(1e8, 1e-3))


def test_membership_is_immutable() -> None:
    m = fold(ms.DeviceSeen("a", state("a"), 0.0))
    with pytest.raises(TypeError):
        m.members["b"] = m.members["a"]  # type: ignore[index]
    with pytest.raises(AttributeError):
        m.generation = 7  # type: ignore[misc]


def test_expire_refuses_a_nonpositive_timeout() -> None:
    with pytest.raises(InvalidInput, match="timeout_s"):
        ms.expire(ms.Membership(), now=0.0, timeout_s=0)
