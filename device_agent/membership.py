"""Cluster membership: which devices are online now, as a pure reducer over events.

The coordinator turns what it hears on the control plane into frozen events —
:class:`DeviceSeen` (a retained "online" state), :class:`DeviceLeft` (the "offline" state
a clean stop publishes), :class:`DeviceLost` (the MQTT last will, or heartbeats that
stopped), :class:`HeartbeatSeen` — and folds them with :func:`apply`; :func:`expire`
turns silence into :class:`DeviceLost` events at a time passed in. Nothing here reads a
clock or touches a socket, so every transition is tested by feeding events.

``Membership.generation`` increases by one whenever the *set* of online devices changes
(a device comes online, leaves, is lost or comes back); a state update of a device that
stays online (its deployments changed) keeps the generation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, assert_never

from edgeswarm.device_agent.protocol import DeviceState
from edgeswarm.placement.cluster import Cluster, LinkSpec
from edgeswarm.placement.errors import InvalidInput

Status = Literal["online", "left", "lost"]


@dataclass(frozen=True)
class DeviceSeen:
    """The device's retained state says "online" (it started, or reconnected)."""

    device: str
    state: DeviceState
    at: float


@dataclass(frozen=True)
class DeviceLeft:
    """The device published "offline" itself: a clean stop."""

    device: str
    at: float


@dataclass(frozen=True)
class DeviceLost:
    """The device vanished: its last will arrived, or its heartbeats stopped."""

    device: str
    at: float
    why: str


@dataclass(frozen=True)
class HeartbeatSeen:
    """A heartbeat from the device."""

    device: str
    at: float


Event = DeviceSeen | DeviceLeft | DeviceLost | HeartbeatSeen


@dataclass(frozen=True)
class Member:
    """What is known of one device: its last state, when it was last heard, its status."""

    state: DeviceState
    last_seen: float
    status: Status


def _frozen(members: Mapping[str, Member]) -> Mapping[str, Member]:
    return MappingProxyType(dict(members))


@dataclass(frozen=True)
class Membership:
    """Every device heard of (online, left or lost) and the generation of the online set."""

    members: Mapping[str, Member] = field(default_factory=lambda: _frozen({}))
    generation: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.members, MappingProxyType):
            object.__setattr__(self, "members", _frozen(self.members))

    def online_ids(self) -> list[str]:
        return sorted(d for d, m in self.members.items() if m.status == "online")


def apply(m: Membership, event: Event) -> Membership:
    """The membership after ``event``; ``m`` itself is never changed."""
    match event:
        case DeviceSeen(device=device, state=state, at=at):
            if state.status == "offline":  # the coordinator maps these to Left/Lost; be safe
                return apply(m, DeviceLeft(device, at))
            old = m.members.get(device)
            member = Member(state, at if old is None else max(at, old.last_seen), "online")
            return _with(m, device, member, changed=old is None or old.status != "online")
        case DeviceLeft(device=device, at=at):
            return _gone(m, device, at, "left")
        case DeviceLost(device=device, at=at):
            return _gone(m, device, at, "lost")
        case HeartbeatSeen(device=device, at=at):
            old = m.members.get(device)
            if old is None or old.status == "left":
                # unknown (its state has not arrived yet) or stopped: only a new "online"
                # state brings it in
                return m
            # a heartbeat revives a device lost to a heartbeat timeout (it hung, then
            # recovered without reconnecting, so it publishes no new state)
            member = replace(old, last_seen=max(at, old.last_seen), status="online")
            return _with(m, device, member, changed=old.status != "online")
        case _:
            assert_never(event)


def expire(m: Membership, now: float, timeout_s: float) -> tuple[Membership, list[DeviceLost]]:
    """Mark lost every online device not heard for longer than its timeout.

    A device's timeout is ``max(timeout_s, 3 * heartbeat_s)`` where ``heartbeat_s`` is the
    period the device announced in its state, so a slow-beating device is not lost early.
    Returns the new membership and the :class:`DeviceLost` events it applied.
    """
    if timeout_s <= 0:
        raise InvalidInput(f"membership: timeout_s must be > 0, got {timeout_s}")
    lost: list[DeviceLost] = []
    for device in m.online_ids():
        member = m.members[device]
        limit = max(timeout_s, 3 * member.state.heartbeat_s)
        silent = now - member.last_seen
        if silent > limit:
            lost.append(DeviceLost(device, now, f"no heartbeat for {silent:.2f} s "
                                                f"(timeout {limit:.2f} s)"))
    for event in lost:
        m = apply(m, event)
    return m, lost


def online(m: Membership) -> list[DeviceState]:
    """The states of the online devices, ordered by device id."""
    return [m.members[d].state for d in m.online_ids()]


def to_cluster(m: Membership, default_link: LinkSpec) -> Cluster:
    """The placement :class:`Cluster` of the online devices, every pair on ``default_link``."""
    states = online(m)
    if not states:
        raise InvalidInput("membership: no device is online; start agents (edgeswarm agent) "
                           "or wait for them with Coordinator.wait_for")
    return Cluster(tuple(s.device.to_device() for s in states), default_link=default_link)


def _with(m: Membership, device: str, member: Member, *, changed: bool) -> Membership:
    members = dict(m.members)
    members[device] = member
    return Membership(_frozen(members), m.generation + 1 if changed else m.generation)


def _gone(m: Membership, device: str, at: float, status: Status) -> Membership:
    old = m.members.get(device)
    if old is None or old.status != "online":
        return m  # unknown, or already gone: nothing changes
    return _with(m, device, Member(old.state, max(at, old.last_seen), status), changed=True)
