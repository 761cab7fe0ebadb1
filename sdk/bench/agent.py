"""``edgeswarm bench agent``: the device-agent daemon measured on this machine.

Real agent processes (the ``edgeswarm agent`` command) on loopback, a real coordinator:

- ``discovery_s``: from spawning N agents (embedded amqtt broker in this process) until the
  coordinator sees all N online over MQTT (``mqtt``), and until one zeroconf browse has
  found all N (``zeroconf``). Both include the agents' start-up (interpreter, imports, the
  device profile), which is what an operator waits for.
- ``lost_s``: ``kill -9`` of one agent until the coordinator reports it lost (the broker
  publishes its last will when the TCP connection drops), repeated ``kills`` times on
  different agents; mean and max.
- ``ping_ms``: round trip of a signed Ping answered by a signed Pong (sealed, published,
  unsealed on the device, sealed again, unsealed here), p50/p99 over ``pings`` pings,
  through Mosquitto and through the embedded broker.

Every wait is bounded by ``timeout_s``; nothing is cached.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgeswarm.placement.errors import Error
from edgeswarm.testbed_agents import LOOPBACK, AgentProcesses, agent_command

__all__ = ["AgentProcesses", "agent_command", "run"]

Progress = Callable[[str], None]
BROWSE_S = 0.5  # one zeroconf browse: answers on loopback come within milliseconds


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The coordinator warns of every lost device: here they are killed on purpose."""
    logger = logging.getLogger("edgeswarm.agent.coordinator")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _workspace() -> Iterator[tuple[Path, Path, bytes]]:
    from edgeswarm.device_agent import keys

    with tempfile.TemporaryDirectory(prefix="edgeswarm-bench-agent-") as tmp:
        workdir = Path(tmp)
        key = keys.generate()
        key_file = keys.write(workdir / "cluster.key", key)
        yield workdir, key_file, key


def run(agents: int = 4, kills: int = 3, pings: int = 200, timeout_s: float = 90.0,
        progress: Progress | None = None) -> dict[str, Any]:
    """Measure and return ``{"discovery_s", "lost_s", "ping_ms"}`` (see the module doc)."""
    from edgeswarm.device_agent.broker import EmbeddedBroker

    if agents < 1 or not 0 <= kills < agents or pings < 1:
        raise Error(f"bench agent needs agents >= 1, 0 <= kills < agents and pings >= 1; got "
                    f"agents={agents}, kills={kills}, pings={pings}")
    say = progress or (lambda _msg: None)
    cluster = f"bench-{secrets.token_hex(3)}"
    with _workspace() as (workdir, key_file, key), _quiet(), EmbeddedBroker() as broker:
        procs = AgentProcesses(workdir, key_file)
        try:
            discovery, lost, ping_embedded = _embedded_part(
                broker.uri, cluster, key, procs, agents, kills, pings, timeout_s, say)
        finally:
            procs.stop_all()
        ping_mosquitto = _mosquitto_part(workdir, key_file, key, pings, timeout_s, say)
    return {"discovery_s": discovery, "lost_s": lost,
            "ping_ms": {"mosquitto": ping_mosquitto, "embedded": ping_embedded},
            "agents": agents, "kills": kills, "pings": pings}


def _embedded_part(uri: str, cluster: str, key: bytes, procs: AgentProcesses, agents: int,
                   kills: int, pings: int, timeout_s: float,
                   say: Progress) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    from edgeswarm.device_agent import discovery as zc
    from edgeswarm.device_agent import membership as ms
    from edgeswarm.device_agent.coordinator import Coordinator

    lost_at: dict[str, float] = {}
    cv = threading.Condition()

    def on_change(_m: ms.Membership, event: ms.Event) -> None:
        if isinstance(event, ms.DeviceLost):
            with cv:
                lost_at.setdefault(event.device, time.monotonic())
                cv.notify_all()

    names = [f"a{i}" for i in range(agents)]
    with Coordinator(uri, cluster, key) as coordinator:
        coordinator.on_change(on_change)
        say(f"spawning {agents} agents")
        browsed: dict[str, float | None] = {"zeroconf": None}
        t0 = time.monotonic()

        def browse() -> None:
            # one-shot browses, again and again: each asks at once, whereas one long browse
            # re-asks only after growing pauses (1, 2, 4, 8 s) and misses announcements
            deadline = t0 + timeout_s
            for _ in range(10_000):
                if time.monotonic() >= deadline:
                    return
                found, _ = zc.browse(cluster, timeout_s=BROWSE_S, interfaces=[LOOPBACK],
                                     expect=agents)
                if len(found) >= agents:
                    browsed["zeroconf"] = time.monotonic() - t0
                    return

        browser = threading.Thread(target=browse, name="edgeswarm-bench-browse", daemon=True)
        browser.start()
        for name in names:
            procs.spawn(name, cluster, uri)
        try:
            coordinator.wait_for(agents, timeout_s)
        except Error as exc:
            raise Error(f"{exc}\nlast lines of {names[0]}'s log:\n{procs.log_tail(names[0])}"
                        ) from exc
        mqtt_s = time.monotonic() - t0
        browser.join(timeout_s)
        say("kill -9")
        lost: list[float] = []
        for name in names[:kills]:
            t_kill = time.monotonic()
            procs.kill(name)
            with cv:
                if cv.wait_for(lambda n=name: n in lost_at, timeout_s):  # type: ignore[misc]
                    lost.append(lost_at[name] - t_kill)
        say(f"{pings} pings through the embedded broker")
        ping = _pings(coordinator, names[-1], pings)
    return ({"mqtt": round(mqtt_s, 4), "zeroconf": _round(browsed["zeroconf"])},
            {"mean": _round(float(np.mean(lost)) if lost else None),
             "max": _round(max(lost) if lost else None), "samples": [round(x, 4) for x in lost]},
            ping)


def _mosquitto_part(workdir: Path, key_file: Path, key: bytes, pings: int, timeout_s: float,
                    say: Progress) -> dict[str, Any]:
    from edgeswarm.device_agent.broker import Mosquitto
    from edgeswarm.device_agent.coordinator import Coordinator
    from edgeswarm.placement.errors import RuntimeNotAvailable

    cluster = f"bench-{secrets.token_hex(3)}"
    try:
        mosquitto = Mosquitto()
        mosquitto.start()
    except (RuntimeNotAvailable, Error) as exc:
        return {"p50": None, "p99": None, "error": str(exc)}
    procs = AgentProcesses(workdir, key_file)
    try:
        with Coordinator(mosquitto.uri, cluster, key) as coordinator:
            say("an agent on Mosquitto")
            procs.spawn("m0", cluster, mosquitto.uri, "--no-advertise")
            coordinator.wait_for(1, timeout_s)
            say(f"{pings} pings through Mosquitto")
            return _pings(coordinator, "m0", pings)
    finally:
        procs.stop_all()
        mosquitto.stop()


def _pings(coordinator: Any, device: str, n: int) -> dict[str, Any]:
    for _ in range(min(10, n)):  # warm-up: first messages pay for lazy setup
        coordinator.ping(device, timeout_s=5.0)
    rtts = np.array([coordinator.ping(device, timeout_s=5.0) for _ in range(n)]) * 1e3
    return {"p50": round(float(np.percentile(rtts, 50)), 4),
            "p99": round(float(np.percentile(rtts, 99)), 4)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
