"""Discovery with real zeroconf on loopback: advertisers and one-shot browses in one process."""

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import pytest
from zeroconf import ServiceInfo, Zeroconf

from edgeswarm.device_agent.discovery import (
    SERVICE,
    Advertiser,
    AgentRecord,
    BrokerAdvertiser,
    browse,
    parse_agent,
)
from edgeswarm.placement.errors import InvalidInput

LO = ["127.0.0.1"]


class Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


#: cluster names unique to this run: other agents on this host (a bench, another test
#: session) advertise on the same loopback and must not match
RUN = uuid.uuid4().hex[:6]
LAB, A, B = f"lab-{RUN}", f"a-{RUN}", f"b-{RUN}"


def agent(device: str, cluster: str = LAB, port: int = 29500) -> AgentRecord:
    return AgentRecord(device=device, cluster=cluster, version="0.1.0", host="127.0.0.1",
                       data_port=port, broker="mqtt://127.0.0.1:1883",
                       metrics_port=9100 if device.endswith("0") else None)


@pytest.fixture
def advertise(no_leaked_threads: None) -> Iterator[Callable[[Sequence[Startable]], None]]:
    """Start advertisers in parallel (each registration probes for ~1.6 s); stop them all."""
    started: list[Startable] = []

    def start(advertisers: Sequence[Startable]) -> None:
        started.extend(advertisers)  # stop() of one that never started is harmless
        with ThreadPoolExecutor(len(advertisers)) as pool:
            list(pool.map(lambda a: a.start(), advertisers))

    yield start
    with ThreadPoolExecutor(max(1, len(started))) as pool:
        list(pool.map(lambda a: a.stop(), started))


def test_four_agents_and_the_broker_are_found(advertise: Callable[[Sequence[Startable]], None],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    records = [agent(f"pi-{i}", port=29500 + i) for i in range(4)]
    advertise([*(Advertiser(r, interfaces=LO) for r in records),
               BrokerAdvertiser("mqtt://127.0.0.1:18830", LAB, interfaces=LO)])
    start = time.monotonic()
    found, brokers = browse(LAB, timeout_s=10, interfaces=LO, expect=4)
    elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\nbrowse found 4 agents in {elapsed * 1e3:.0f} ms")
    assert found == records  # sorted by device; every TXT field round-trips
    assert elapsed < 5.0   # returned on finding 4, well before the 10 s timeout
    # it returned on the 4th agent: the broker's own record may not have arrived yet
    assert set(brokers) <= {"mqtt://127.0.0.1:18830", "mqtt://127.0.0.1:1883"}
    # an agent looking only for its broker stops as soon as it has one
    start = time.monotonic()
    _, brokers = browse(LAB, timeout_s=10, interfaces=LO, expect_brokers=2)
    assert time.monotonic() - start < 5.0
    assert brokers == ["mqtt://127.0.0.1:18830", "mqtt://127.0.0.1:1883"]  # advertised first


@pytest.mark.slow
def test_browse_filters_by_cluster_and_forgets_stopped_agents(
        advertise: Callable[[Sequence[Startable]], None]) -> None:
    leaving = Advertiser(agent("leaving", A), interfaces=LO)
    advertise([leaving, Advertiser(agent("staying", A), interfaces=LO),
               Advertiser(agent("other", B), interfaces=LO),
               BrokerAdvertiser("mqtt://127.0.0.1:1884", B, interfaces=LO)])

    found, _ = browse(A, timeout_s=1.0, interfaces=LO)
    assert [r.device for r in found] == ["leaving", "staying"]
    found, brokers = browse(None, timeout_s=1.0, interfaces=LO)
    assert [(r.cluster, r.device) for r in found if r.cluster in (A, B)] == [
        (A, "leaving"), (A, "staying"), (B, "other")]
    assert "mqtt://127.0.0.1:1884" in brokers
    assert "mqtt://127.0.0.1:1884" not in browse(A, timeout_s=0.5, interfaces=LO)[1]

    leaving.stop()
    found, _ = browse(A, timeout_s=1.0, interfaces=LO)
    assert [r.device for r in found] == ["staying"]


class ForeignRecord:
    """A peer advertising a malformed edgeswarm record with plain zeroconf."""

    def __init__(self) -> None:
        self.zc = Zeroconf(interfaces=LO)
        self.info = ServiceInfo(SERVICE, f"bad.{SERVICE}", addresses=[bytes([127, 0, 0, 1])],
                                port=1, server="bad-peer.local.",
                                properties={"device": "bad/../name", "cluster": "m",
                                            "version": "1", "data_port": "99999",
                                            "broker": "x"})

    def start(self) -> None:
        self.zc.register_service(self.info)

    def stop(self) -> None:
        self.zc.close()


@pytest.mark.slow
def test_a_malformed_peer_record_is_skipped(
        advertise: Callable[[Sequence[Startable]], None]) -> None:
    advertise([Advertiser(agent("good", "m"), interfaces=LO), ForeignRecord()])
    found, _ = browse("m", timeout_s=1.5, interfaces=LO)
    assert [r.device for r in found] == ["good"]


def test_nothing_found_returns_empty_after_the_timeout(no_leaked_threads: None) -> None:
    start = time.monotonic()
    assert browse("nobody-here", timeout_s=0.5, interfaces=LO) == ([], [])
    assert 0.5 <= time.monotonic() - start < 2.0


def test_parse_agent_checks_every_field() -> None:
    record = agent("pi-0")
    props: dict[str, str | None] = dict(record.properties())
    assert parse_agent(props, ["::1", "127.0.0.1"]) == record  # IPv4 preferred
    for key, value in [("device", "a/b"), ("cluster", None), ("data_port", "0"),
                       ("data_port", "http"), ("metrics_port", "70000"), ("broker", "")]:
        with pytest.raises(ValueError, match=key.split("_")[0] if value else key):
            parse_agent({**props, key: value}, ["127.0.0.1"])
    with pytest.raises(ValueError, match="address"):
        parse_agent(props, [])


def test_advertisers_refuse_bad_input() -> None:
    with pytest.raises(InvalidInput, match="unspecified"):
        Advertiser(AgentRecord("d", "c", "1", "0.0.0.0", 1, "mqtt://h:1"))
    with pytest.raises(InvalidInput, match="device name"):
        Advertiser(AgentRecord("d/1", "c", "1", "127.0.0.1", 1, "mqtt://h:1"))
    with pytest.raises(InvalidInput, match="data port"):
        Advertiser(AgentRecord("d", "c", "1", "127.0.0.1", 0, "mqtt://h:1"))
    with pytest.raises(InvalidInput, match="mqtt://HOST:PORT"):
        BrokerAdvertiser("http://127.0.0.1:80", "c")
    # long names still give a valid (<= 63 byte) instance name
    long = Advertiser(AgentRecord("d" * 64, "c" * 64, "1", "127.0.0.1", 1, "mqtt://h:1"))
    assert long.record.device == "d" * 64
