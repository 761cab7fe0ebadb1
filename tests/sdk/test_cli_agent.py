"""``edgeswarm keygen``, ``edgeswarm agent`` and ``edgeswarm devices``: key files, option
errors, zeroconf listing of real agents, and a zero-configuration cluster of real agent
processes (one runs the embedded broker on a free port, the other finds it by zeroconf)."""

import json
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeswarm.bench.agent import agent_command
from edgeswarm.cli import app
from edgeswarm.device_agent import discovery, keys
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.coordinator import Coordinator
from edgeswarm.placement.errors import InvalidInput

runner = CliRunner()
LOOPBACK = "127.0.0.1"


def test_keygen_writes_a_private_key_and_refuses_to_overwrite_it(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "cluster.key"
    result = runner.invoke(app, ["keygen", "-o", str(path)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = keys.read(path)
    assert len(key) == 32
    again = runner.invoke(app, ["keygen", "-o", str(path)])
    assert isinstance(again.exception, InvalidInput) and "--force" in str(again.exception)
    assert keys.read(path) == key
    forced = runner.invoke(app, ["keygen", "-o", str(path), "--force"])
    assert forced.exit_code == 0 and keys.read(path) != key


def test_keygen_defaults_to_the_environment_variable(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESWARM_KEY_FILE", str(tmp_path / "env.key"))
    assert runner.invoke(app, ["keygen"]).exit_code == 0
    assert len(keys.read(tmp_path / "env.key")) == 32


@pytest.mark.parametrize(("args", "message"), [
    (["--broker", "mqtt://127.0.0.1:1", "--embedded-broker"], "not both"),
    (["--name", "no spaces"], "name"),
    (["--speed", "0"], "speed"),
])
def test_agent_option_errors_are_one_clear_line(args: list[str], message: str,
                                                tmp_path: Path) -> None:
    key_file = keys.write(tmp_path / "k", keys.generate())
    argv = ["agent", "--name", "x", "--key-file", str(key_file), *args]
    result = runner.invoke(app, argv)
    assert isinstance(result.exception, InvalidInput), result.output
    assert str(result.exception).startswith("agent options:") and message in str(
        result.exception)


def test_agent_without_its_key_file_says_so(tmp_path: Path) -> None:
    result = runner.invoke(app, ["agent", "--name", "x", "--key-file", str(tmp_path / "none")])
    assert isinstance(result.exception, InvalidInput)
    assert "none" in str(result.exception)


@pytest.fixture
def advertised(tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig(name="listed", cluster="cli-list", embedded_broker=True, broker_port=0,
                         interfaces=[LOOPBACK], profile_s=0.03, metrics_port=0,
                         artifacts_dir=tmp_path)
    agent = Agent(config, keys.generate())
    agent.start()
    assert agent.advertised(10.0)
    yield agent
    agent.stop()


def test_devices_lists_advertised_agents_and_brokers(advertised: Agent) -> None:
    argv = ["devices", "--cluster", "cli-list", "--timeout", "1.5", "--interface", LOOPBACK]
    result = runner.invoke(app, [*argv, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert advertised.probe is not None
    assert doc["agents"] == [{"device": "listed", "cluster": "cli-list", "version": "0.1.0",
                              "host": LOOPBACK, "data_port": advertised.probe.port,
                              "broker": advertised.broker_uri,
                              "metrics_port": advertised.metrics_port}]
    assert doc["brokers"] == [advertised.broker_uri]
    table = runner.invoke(app, argv)
    assert table.exit_code == 0 and "listed" in table.stdout and "1 agent(s)" in table.stdout
    other = runner.invoke(app, ["devices", "--cluster", "elsewhere", "--timeout", "0.5",
                                "--interface", LOOPBACK, "--json"])
    assert json.loads(other.stdout) == {"agents": [], "brokers": []}


@pytest.mark.slow
def test_a_zero_configuration_cluster_of_agent_processes(tmp_path: Path) -> None:
    key = keys.generate()
    key_file = keys.write(tmp_path / "cluster.key", key)
    common = ["--cluster", "zeroconf", "--key-file", str(key_file), "--interface", LOOPBACK,
              "--artifacts-dir", str(tmp_path / "art")]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(
            [*agent_command(), "agent", "--name", "hub", "--embedded-broker", "--broker-port",
             "0", *common], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        agents, brokers = discovery.browse("zeroconf", timeout_s=60, interfaces=[LOOPBACK],
                                           expect=1)
        assert [a.device for a in agents] == ["hub"] and len(brokers) == 1, brokers
        # no --broker: it finds the hub's broker by zeroconf
        procs.append(subprocess.Popen([*agent_command(), "agent", "--name", "leaf", *common],
                                      stdin=subprocess.DEVNULL, stderr=subprocess.PIPE))
        with Coordinator(brokers[0], "zeroconf", key) as c:
            states = c.wait_for(2, 60)
            assert sorted(s.device.id for s in states) == ["hub", "leaf"]
            assert c.ping("leaf", timeout_s=5) < 1.0
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            _, err = p.communicate(timeout=30)
            assert p.returncode == 0, err.decode()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate(timeout=10)
