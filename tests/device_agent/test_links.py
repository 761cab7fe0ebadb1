"""Emulated links: link specs (``100mbit:5ms``) parsed and refused by name, the optional
``links`` of a DeviceState (old states without it still valid), and an agent that publishes
its ``--link``/``--link-to`` table in its state through a real broker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgeswarm.cli import app
from edgeswarm.device_agent import keys, topics
from edgeswarm.device_agent.agent import Agent, AgentConfig
from edgeswarm.device_agent.coordinator import Coordinator
from edgeswarm.device_agent.manifest import LinkShape, format_link, parse_link
from edgeswarm.device_agent.protocol import DeviceProfile, DeviceState, seal, unseal
from edgeswarm.placement.errors import InvalidInput

KEY = bytes(range(32))


@pytest.mark.parametrize(("spec", "bandwidth_Bps", "latency_s"), [
    ("100mbit:5ms", 12.5e6, 0.005),
    ("1gbit:1ms", 125e6, 0.001),
    ("10mbit:20ms", 1.25e6, 0.020),
    ("50mbps:2ms", 50e6, 0.002),        # tc's convention: "bps" units are bytes per second
    ("12.5MB/s:500us", 12.5e6, 0.0005),
    ("64kbit:1s", 8e3, 1.0),
    ("100Mbit", 12.5e6, 0.0),           # no latency; units are case-insensitive
    (" 2 gbit : 0.5 ms ", 250e6, 0.0005),
])
def test_link_specs_parse_to_bytes_per_second_and_seconds(spec: str, bandwidth_Bps: float,
                                                          latency_s: float) -> None:
    link = parse_link(spec)
    assert link.bandwidth_Bps == pytest.approx(bandwidth_Bps)
    assert link.latency_s == pytest.approx(latency_s)
    assert parse_link(format_link(link)) == link   # the short form reads back the same


@pytest.mark.parametrize(("spec", "why"), [
    ("fast", "is not RATE[:LATENCY]"),
    ("100", "is not RATE[:LATENCY]"),
    ("100mbit:5", "is not RATE[:LATENCY]"),
    ("100mbit:5ms:1", "is not RATE[:LATENCY]"),
    ("100furlongs:5ms", "unknown rate unit 'furlongs'"),
    ("100mbit:5min", "unknown latency unit 'min'"),
    ("100Mb/s:5ms", "ambiguous"),
    ("0mbit:5ms", "must be > 0"),
    ("", "is not RATE[:LATENCY]"),
])
def test_bad_link_specs_are_refused_naming_the_spec(spec: str, why: str) -> None:
    with pytest.raises(InvalidInput, match="link spec") as info:
        parse_link(spec)
    assert repr(spec) in str(info.value) and why in str(info.value)


def test_format_link_is_short() -> None:
    assert format_link(LinkShape(bandwidth_Bps=12.5e6, latency_s=0.005)) == "100mbit:5ms"
    assert format_link(LinkShape(bandwidth_Bps=125e6, latency_s=0.0002)) == "1gbit:200us"


def _profile() -> DeviceProfile:
    return DeviceProfile(id="pi-1", flops=1e9, int8_ops=0.0, memory_bytes=1 << 30,
                         runtimes=["onnx"], cores=4, speed=0.5, platform="Linux-aarch64")


def test_a_state_without_links_is_still_valid_and_links_round_trip() -> None:
    old = {"status": "online", "device": _profile().model_dump(), "agent_version": "0.1.0",
           "data_host": "127.0.0.1", "data_port": 29600, "heartbeat_s": 0.5}
    assert DeviceState.model_validate(old).links == {}
    state = DeviceState.model_validate({**old, "links": {
        "*": {"bandwidth_Bps": 12.5e6, "latency_s": 0.005},
        "pi-2": {"bandwidth_Bps": 1.25e6, "latency_s": 0.02}}})
    topic = topics.state("lab", "pi-1")
    raw = seal(KEY, topic, "pi-1", state, now=1.0)
    assert json.loads(raw)["body"]["links"]["pi-2"] == {"bandwidth_Bps": 1.25e6,
                                                        "latency_s": 0.02}
    _, back = unseal(KEY, topic, raw, 1.0, None, DeviceState, max_age_s=None)
    assert back == state and back.links["pi-2"] == parse_link("10mbit:20ms")


def test_agent_config_refuses_a_link_to_a_bad_peer_name() -> None:
    with pytest.raises(ValueError, match="not a device id"):
        AgentConfig(name="a", links={"no spaces": parse_link("1mbit")})


def test_an_agent_publishes_its_links_in_its_state(embedded_broker, tmp_path: Path,
                                                  no_leaked_threads) -> None:
    links = {"*": parse_link("100mbit:5ms"), "pi-2": parse_link("10mbit:20ms")}
    config = AgentConfig(name="pi-1", cluster="links", broker=embedded_broker.uri,
                         advertise=False, profile_s=0.03, links=links, artifacts_dir=tmp_path)
    with Coordinator(embedded_broker.uri, "links", KEY) as coordinator:
        agent = Agent(config, KEY)
        agent.start()
        try:
            [state] = coordinator.wait_for(1, timeout_s=10)
        finally:
            agent.stop()
    assert state.links == links


@pytest.mark.parametrize(("args", "message"), [
    (["--link", "lightspeed"], "'lightspeed'"),
    (["--link-to", "pi-2"], "expected PEER=SPEC"),
    (["--link-to", "pi-2=1xbit"], "unknown rate unit 'xbit'"),
    (["--link-to", "bad peer=1mbit"], "not a device id"),
])
def test_agent_link_options_refuse_bad_input(args: list[str], message: str,
                                             tmp_path: Path) -> None:
    key_file = keys.write(tmp_path / "k", keys.generate())
    result = CliRunner().invoke(app, ["agent", "--name", "x", "--key-file", str(key_file),
                                      *args])
    assert isinstance(result.exception, InvalidInput), result.output
    assert message in str(result.exception)
