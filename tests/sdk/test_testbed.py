"""The simulated edge testbed: real agent processes on loopback with their emulated speeds and
links in their states, kill -9 seen as lost, a join seen online, nothing left behind by
``stop()``; and ``edgeswarm testbed`` itself, with churn, exiting 0 on its own."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edgeswarm.device_agent.broker import Mosquitto
from edgeswarm.device_agent.manifest import parse_link
from edgeswarm.placement.errors import Error, InvalidInput
from edgeswarm.testbed import AgentStatus, Testbed, TestbedConfig
from edgeswarm.testbed_agents import agent_command
from edgeswarm.testbed_profile import TestbedDevice, TestbedProfile


def _cluster() -> str:
    return f"tb-{secrets.token_hex(3)}"   # unique: other agents on this host must not match


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout_s} s")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_three_agents_come_up_with_their_speeds_and_links_survive_churn_and_stop_clean(
        no_leaked_threads: None) -> None:
    profile = TestbedProfile(default_link="100mbit:5ms", devices=[
        TestbedDevice(id="laptop-1"),
        TestbedDevice(id="pi-1", speed=0.25, links={"laptop-1": "10mbit:20ms"}),
        TestbedDevice(id="phone-1", speed=0.4, links={"*": "50mbit:10ms"})])
    tb = Testbed(TestbedConfig(profile=profile, cluster=_cluster()))
    pids: list[int] = []
    with tb:
        key_file = tb.key_file
        assert tb.names == ["laptop-1", "pi-1", "phone-1"]
        assert tb.up_s is not None and 0 < tb.up_s < 60
        assert [(s.name, s.status, s.alive) for s in tb.status()] == [
            ("laptop-1", "online", True), ("pi-1", "online", True), ("phone-1", "online", True)]
        pids = [s.pid for s in tb.status()]

        coordinator = tb.coordinator()
        states = {s.device.id: s for s in coordinator.wait_for(3, timeout_s=10)}
        assert {d: s.device.speed for d, s in states.items()} == {
            "laptop-1": 1.0, "pi-1": 0.25, "phone-1": 0.4}
        assert states["laptop-1"].links == {"*": parse_link("100mbit:5ms")}
        assert states["pi-1"].links == {"*": parse_link("100mbit:5ms"),
                                        "laptop-1": parse_link("10mbit:20ms")}
        assert states["phone-1"].links == {"*": parse_link("50mbit:10ms")}

        tb.kill("pi-1")
        _wait_until(lambda: _status(tb, "pi-1").status == "lost", 10, "pi-1 seen lost")
        assert not _status(tb, "pi-1").alive and _status(tb, "pi-1").exit_code == -9
        assert tb.names == ["laptop-1", "phone-1"]
        with pytest.raises(InvalidInput, match="not running any more"):
            tb.kill("pi-1")
        with pytest.raises(InvalidInput, match="already running"):
            tb.join("laptop-1")

        tb.join("pi-2", speed=0.3, links={"*": "10mbit:20ms"})
        assert _status(tb, "pi-2").online and tb.names[-1] == "pi-2"
        _wait_until(lambda: "pi-2" in {s.device.id for s in coordinator.devices()}, 10,
                    "the caller's coordinator sees pi-2")
        [pi2] = [s for s in coordinator.devices() if s.device.id == "pi-2"]
        assert pi2.device.speed == 0.3 and pi2.links == {"*": parse_link("10mbit:20ms")}
        pids.append(_status(tb, "pi-2").pid)

        # a wait that cannot be met names the agent and shows its log
        with pytest.raises(Error, match=r"not online within 0\.05 s: pi-3") as info:
            tb.join("pi-3", timeout_s=0.05)
        assert "last lines of pi-3's log" in str(info.value)
        pids.append(_status(tb, "pi-3").pid)
    assert all(_gone(pid) for pid in pids), [p for p in pids if not _gone(p)]
    assert not key_file.exists()   # the temporary key and every agent's files are removed
    tb.stop()   # twice is fine


def _status(tb: Testbed, name: str) -> AgentStatus:
    return next(s for s in tb.status() if s.name == name)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_cli_runs_churn_for_its_duration_and_exits_0_leaving_no_agents(
        tmp_path: Path) -> None:
    churn = tmp_path / "churn.txt"
    churn.write_text("at 0.2 kill dev-1   # kill -9\nat 0.4 leave dev-2\n"
                     "at 0.6 join dev-9 speed=0.5 link=10mbit:20ms\n")
    key_file = tmp_path / "keys" / "cluster.key"
    with Mosquitto() as mosquitto:   # --broker: a real Mosquitto instead of the embedded one
        uri = mosquitto.uri
        proc = subprocess.run(
            [*agent_command(), "testbed", "--devices", "3", "--profile", "uniform",
             "--link", "1gbit:1ms", "--churn", str(churn), "--cluster", _cluster(),
             "--broker", uri, "--key-file", str(key_file), "--json-status",
             "--duration", "3"],
            capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    ready = lines[0]
    assert ready["event"] == "ready" and ready["broker"] == uri
    assert ready["key_file"] == str(key_file) and key_file.exists()   # kept: it was asked for
    assert [(d["name"], d["status"], d["links"]) for d in ready["devices"]] == [
        (f"dev-{i}", "online", {"*": "1gbit:1ms"}) for i in (1, 2, 3)]
    messages = [line["message"] for line in lines if line["event"] == "log"]
    for expected in ("churn line 1: kill dev-1", "churn line 2: leave dev-2",
                     "churn line 3: join dev-9", "dev-1: online -> lost",
                     "dev-2: online -> left"):
        assert expected in messages, messages
    assert lines[-1] == {"event": "stopped"}
    pids = {d["pid"] for line in lines if "devices" in line for d in line["devices"]}
    assert len(pids) == 4 and all(_gone(pid) for pid in pids)
