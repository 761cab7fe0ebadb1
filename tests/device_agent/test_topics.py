"""The topic tree: exact strings, wildcards that match them, names that cannot escape."""

from __future__ import annotations

import pytest

from edgeswarm.device_agent import topics
from edgeswarm.placement.errors import InvalidInput


def test_device_topics_are_the_documented_strings() -> None:
    assert topics.state("lab", "pi-1") == "edgeswarm/v1/lab/devices/pi-1/state"
    assert topics.cmd("lab", "pi-1") == "edgeswarm/v1/lab/devices/pi-1/cmd"
    assert topics.events("lab", "pi-1") == "edgeswarm/v1/lab/devices/pi-1/events"
    assert topics.heartbeat("lab", "pi-1") == "edgeswarm/v1/lab/devices/pi-1/heartbeat"
    assert topics.all_states("lab") == "edgeswarm/v1/lab/devices/+/state"
    assert topics.all_events("lab") == "edgeswarm/v1/lab/devices/+/events"
    assert topics.all_heartbeats("lab") == "edgeswarm/v1/lab/devices/+/heartbeat"


def matches(pattern: str, topic: str) -> bool:
    """MQTT's single-level wildcard rule (enough for the filters above)."""
    p, t = pattern.split("/"), topic.split("/")
    return len(p) == len(t) and all(a in ("+", b) for a, b in zip(p, t, strict=True))


def test_wildcards_match_every_device_and_nothing_else() -> None:
    for device in ("pi-1", "jetson.0", "A_b"):
        assert matches(topics.all_states("lab"), topics.state("lab", device))
        assert matches(topics.all_events("lab"), topics.events("lab", device))
        assert matches(topics.all_heartbeats("lab"), topics.heartbeat("lab", device))
        assert not matches(topics.all_states("lab"), topics.cmd("lab", device))
        assert not matches(topics.all_states("other"), topics.state("lab", device))


@pytest.mark.parametrize("leaf", topics.LEAVES)
def test_parse_inverts_every_builder(leaf: str) -> None:
    build = {"state": topics.state, "cmd": topics.cmd, "events": topics.events,
             "heartbeat": topics.heartbeat}[leaf]
    assert topics.parse(build("c-1", "dev.9")) == ("c-1", "dev.9", leaf)


@pytest.mark.parametrize("topic", [
    "", "edgeswarm/v1/lab/devices/pi-1", "edgeswarm/v2/lab/devices/pi-1/state",
    "other/v1/lab/devices/pi-1/state", "edgeswarm/v1/lab/hosts/pi-1/state",
    "edgeswarm/v1/lab/devices/pi-1/reboot", "edgeswarm/v1/lab/devices/+/state",
    "edgeswarm/v1/#", "edgeswarm/v1/lab/devices/pi-1/state/extra",
    "edgeswarm/v1/lab/devices//state",
])
def test_parse_rejects_foreign_topics(topic: str) -> None:
    with pytest.raises(InvalidInput, match="not an edgeswarm device topic"):
        topics.parse(topic)


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "a b", "x" * 65, "é", "a\x00"])
def test_bad_names_are_refused_everywhere(name: str) -> None:
    with pytest.raises(InvalidInput, match="not valid"):
        topics.check_name(name)
    with pytest.raises(InvalidInput, match="device name"):
        topics.cmd("lab", name)
    with pytest.raises(InvalidInput, match="cluster name"):
        topics.all_events(name)


def test_good_names_pass() -> None:
    for name in ("a", "x" * 64, "Pi-4_b.local", "coordinator"):
        assert topics.check_name(name) == name


def test_qos_and_retain_per_leaf() -> None:
    assert topics.QOS == {"state": 1, "cmd": 1, "events": 1, "heartbeat": 0}
    assert [leaf for leaf in topics.LEAVES if topics.RETAIN[leaf]] == ["state"]
