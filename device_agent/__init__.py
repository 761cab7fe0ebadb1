"""The device-agent daemon: discovery, control plane, data plane, shard execution.

The front door of ``edgeswarm.device_agent``: the daemon (:class:`Agent` and its
:class:`AgentConfig`), the :class:`Coordinator` that watches a cluster and commands it, the
deploy :class:`Manifest`, the brokers and zeroconf :func:`browse`. Names are imported on
first use, so importing one module (``protocol``, ``membership``) does not pull in paho,
zeroconf or torch. The modules, in the order data flows through them, are described in
``docs/agent.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgeswarm.device_agent.agent import Agent, AgentConfig
    from edgeswarm.device_agent.artifacts import ArtifactServer, ArtifactStore
    from edgeswarm.device_agent.broker import EmbeddedBroker, Mosquitto
    from edgeswarm.device_agent.control import ControlClient, TlsConfig
    from edgeswarm.device_agent.coordinator import Coordinator, DeployFailed, WaitTimeout
    from edgeswarm.device_agent.discovery import AgentRecord, browse
    from edgeswarm.device_agent.manifest import Artifact, Manifest, Shard
    from edgeswarm.device_agent.membership import Membership
    from edgeswarm.device_agent.protocol import DeviceProfile, DeviceState, Rejected

_HOME = {
    "Agent": "agent", "AgentConfig": "agent",
    "ArtifactServer": "artifacts", "ArtifactStore": "artifacts",
    "EmbeddedBroker": "broker", "Mosquitto": "broker",
    "ControlClient": "control", "TlsConfig": "control",
    "Coordinator": "coordinator", "DeployFailed": "coordinator", "WaitTimeout": "coordinator",
    "AgentRecord": "discovery", "browse": "discovery",
    "Artifact": "manifest", "Manifest": "manifest", "Shard": "manifest",
    "Membership": "membership",
    "DeviceProfile": "protocol", "DeviceState": "protocol", "Rejected": "protocol",
}

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentRecord",
    "Artifact",
    "ArtifactServer",
    "ArtifactStore",
    "ControlClient",
    "Coordinator",
    "DeployFailed",
    "DeviceProfile",
    "DeviceState",
    "EmbeddedBroker",
    "Manifest",
    "Membership",
    "Mosquitto",
    "Rejected",
    "Shard",
    "TlsConfig",
    "WaitTimeout",
    "browse",
]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'edgeswarm.device_agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edgeswarm.device_agent.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
