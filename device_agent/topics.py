"""The MQTT topic tree of the control plane (pure functions, no I/O).

::

    edgeswarm/v1/<cluster>/devices/<device>/state       agent -> all, retained, QoS 1
    edgeswarm/v1/<cluster>/devices/<device>/cmd         coordinator -> agent, QoS 1
    edgeswarm/v1/<cluster>/devices/<device>/events      agent -> coordinator, QoS 1
    edgeswarm/v1/<cluster>/devices/<device>/heartbeat   agent -> coordinator, QoS 0

Cluster and device names are ``[A-Za-z0-9_.-]{1,64}``: no MQTT wildcard (``+``, ``#``),
no ``/``, nothing that could escape its level of the tree.
"""

from __future__ import annotations

import re
from typing import Literal, cast

from edgeswarm.placement.cluster import DeviceId
from edgeswarm.placement.errors import InvalidInput

ROOT = "edgeswarm/v1"

NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
_NAME = re.compile(NAME_PATTERN)

Leaf = Literal["state", "cmd", "events", "heartbeat"]
LEAVES: tuple[Leaf, ...] = ("state", "cmd", "events", "heartbeat")

# Quality of service and retain flag of each leaf: what publishers must use.
QOS: dict[Leaf, int] = {"state": 1, "cmd": 1, "events": 1, "heartbeat": 0}
RETAIN: dict[Leaf, bool] = {"state": True, "cmd": False, "events": False, "heartbeat": False}


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it is a valid cluster or device name, else raise InvalidInput."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidInput(
            f"{what} {name!r} is not valid: use 1 to 64 letters, digits, '_', '.' or '-'")
    return name


def _device_topic(cluster: str, device: str, leaf: Leaf) -> str:
    check_name(cluster, "cluster name")
    check_name(device, "device name")
    return f"{ROOT}/{cluster}/devices/{device}/{leaf}"


def _wildcard(cluster: str, leaf: Leaf) -> str:
    check_name(cluster, "cluster name")
    return f"{ROOT}/{cluster}/devices/+/{leaf}"


def state(cluster: str, device: str) -> str:
    """The device's retained state (online/offline, profile, endpoints)."""
    return _device_topic(cluster, device, "state")


def cmd(cluster: str, device: str) -> str:
    """Commands for the device (ping, deploy, teardown)."""
    return _device_topic(cluster, device, "cmd")


def events(cluster: str, device: str) -> str:
    """What the device reports (pong, deployed, torn_down, error, telemetry)."""
    return _device_topic(cluster, device, "events")


def heartbeat(cluster: str, device: str) -> str:
    """The device's periodic liveness beat."""
    return _device_topic(cluster, device, "heartbeat")


def all_states(cluster: str) -> str:
    """Subscription filter for every device's state in the cluster."""
    return _wildcard(cluster, "state")


def all_events(cluster: str) -> str:
    """Subscription filter for every device's events in the cluster."""
    return _wildcard(cluster, "events")


def all_heartbeats(cluster: str) -> str:
    """Subscription filter for every device's heartbeat in the cluster."""
    return _wildcard(cluster, "heartbeat")


def parse(topic: str) -> tuple[str, DeviceId, Leaf]:
    """Split a concrete device topic into ``(cluster, device, leaf)``.

    Raises InvalidInput for anything else: another root, a wildcard, an unknown leaf.
    """
    parts = topic.split("/") if isinstance(topic, str) else []
    root = ROOT.split("/")
    if (len(parts) != 6 or parts[:2] != root or parts[3] != "devices"
            or parts[5] not in LEAVES
            or _NAME.fullmatch(parts[2]) is None or _NAME.fullmatch(parts[4]) is None):
        raise InvalidInput(
            f"topic {topic!r} is not an edgeswarm device topic: expected "
            f"{ROOT}/<cluster>/devices/<device>/{{{','.join(LEAVES)}}}")
    return parts[2], DeviceId(parts[4]), cast(Leaf, parts[5])
