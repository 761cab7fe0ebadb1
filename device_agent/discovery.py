"""Finding agents and brokers with no configuration: DNS-SD over multicast DNS (zeroconf).

Every agent advertises one ``_edgeswarm._tcp.local.`` service whose TXT record says who it
is (device id, cluster, agent version, data and metrics ports, the broker it uses); an
embedded broker advertises ``_mqtt._tcp.local.`` with its cluster and URI. ``browse`` is a
one-shot query (RFC 6762 §5.1): it asks from an ephemeral port, so every responder answers
it by unicast at once — no one-second multicast rate limit, no duplicate-query suppression,
and it works when many agents share port 5353 on one host (the testbed). Brokers are the
advertised ones first, then the ones agents report in their TXT records.

On loopback (the testbed, tests) pass ``interfaces=["127.0.0.1"]``; across network
namespaces the veth also needs a multicast route. Records from peers are validated like any
network input: a malformed one is skipped with a debug log.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import queue
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from zeroconf import (
    EventLoopBlocked,
    InterfaceChoice,
    NonUniqueNameException,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from edgeswarm.device_agent import topics
from edgeswarm.placement.errors import Error, InvalidInput

log = logging.getLogger("edgeswarm.agent.discovery")

SERVICE = "_edgeswarm._tcp.local."
BROKER_SERVICE = "_mqtt._tcp.local."
TXT_VERSION = "1"
_MAX_EVENTS = 10_000  # browse handles at most this many service events, however long it runs


@dataclass(frozen=True)
class AgentRecord:
    """What an agent advertises; ``host`` is the address peers reach it on."""

    device: str
    cluster: str
    version: str
    host: str
    data_port: int
    broker: str
    metrics_port: int | None = None

    def properties(self) -> dict[str, str]:
        """The TXT record."""
        txt = {"txtvers": TXT_VERSION, "device": self.device, "cluster": self.cluster,
               "version": self.version, "data_port": str(self.data_port),
               "broker": self.broker}
        if self.metrics_port is not None:
            txt["metrics_port"] = str(self.metrics_port)
        return txt


def _zeroconf(interfaces: Sequence[str] | None, unicast: bool = False) -> Zeroconf:
    chosen: InterfaceChoice | list[str] = (InterfaceChoice.All if interfaces is None
                                           else list(interfaces))
    try:
        return Zeroconf(interfaces=chosen, unicast=unicast)
    except OSError as exc:
        raise Error(f"cannot open multicast DNS sockets on {interfaces or 'all interfaces'}: "
                    f"{exc}; check the interface addresses (loopback: ['127.0.0.1'])") from exc


def _instance(kind: str, *parts: str) -> str:
    """A readable DNS-SD instance name of at most 63 bytes, unique for ``parts``."""
    readable = "@".join(parts)
    if len(readable.encode()) <= 63:
        return readable
    digest = hashlib.sha256(f"{kind}/{readable}".encode()).hexdigest()[:16]
    return f"{readable[:46]}~{digest}"


def _hostname(*parts: str) -> str:
    digest = hashlib.sha256("/".join(parts).encode()).hexdigest()[:12]
    return f"edgeswarm-{digest}.local."


def _packed(host: str, what: str) -> bytes:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:
            address = ipaddress.ip_address(socket.gethostbyname(host))
        except OSError as exc:
            raise InvalidInput(f"{what} host {host!r} does not resolve: {exc}") from exc
    if address.is_unspecified:
        raise InvalidInput(f"{what} host {host} is unspecified: advertise the address peers "
                           f"should connect to (e.g. this device's LAN address)")
    return address.packed


class _Registration:
    """One zeroconf service kept registered between start() and stop()."""

    def __init__(self, info: ServiceInfo, interfaces: Sequence[str] | None, what: str) -> None:
        self._info = info
        self._interfaces = interfaces
        self._what = what
        self._zc: Zeroconf | None = None
        self._thread: threading.Thread | None = None

    def start(self, wait: bool = True) -> None:
        """Probe, then announce. ``wait=False`` does it in a thread: probing takes about
        1.7 s (RFC 6762's three probes, then announcements) that a daemon need not wait."""
        if self._zc is not None:
            raise Error(f"{self._what} is already advertised; call stop() first")
        zc = _zeroconf(self._interfaces)
        self._zc = zc
        if wait:
            self._register(zc, raise_errors=True)
            return
        self._thread = threading.Thread(target=self._register, args=(zc, False), daemon=True,
                                        name="edgeswarm-advertise")
        self._thread.start()

    def wait(self, timeout_s: float) -> bool:
        """Wait for a registration started with ``wait=False``; True once advertised."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
        return self._zc is not None

    def _register(self, zc: Zeroconf, raise_errors: bool) -> None:
        try:
            zc.register_service(self._info)
        except (NonUniqueNameException, EventLoopBlocked) as exc:
            self._zc = None
            zc.close()
            what = ("is already advertised by another process on this network; pick "
                    "another name" if isinstance(exc, NonUniqueNameException)
                    else "timed out (zeroconf's loop is blocked); try again")
            error: Error = (InvalidInput(f"{self._what} {what}")
                            if isinstance(exc, NonUniqueNameException)
                            else Error(f"advertising {self._what} {what}"))
            if raise_errors:
                raise error from exc
            log.error("%s", error)
            return
        log.info("advertising %s as %s", self._what, self._info.name)

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            zc.unregister_service(self._info)  # goodbye packets: browsers forget it at once
        except EventLoopBlocked:
            log.warning("could not send goodbye for %s; peers forget it when its TTL ends",
                        self._what)
        finally:
            zc.close()


class _Advertised:
    """A record kept advertised between start() and stop() (a context manager too)."""

    _registration: _Registration

    def start(self, wait: bool = True) -> None:
        """Register (probe, then announce); returns once peers can find the record, or at
        once with ``wait=False`` (registration goes on in a thread; failures are logged)."""
        self._registration.start(wait)

    def wait(self, timeout_s: float) -> bool:
        """True once the record is advertised (see ``start(wait=False)``)."""
        return self._registration.wait(timeout_s)

    def stop(self) -> None:
        """Withdraw the record (goodbye packets) and close the sockets."""
        self._registration.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class Advertiser(_Advertised):
    """Advertises one agent as ``<device>@<cluster>._edgeswarm._tcp.local.``."""

    def __init__(self, record: AgentRecord, interfaces: Sequence[str] | None = None) -> None:
        topics.check_name(record.device, "device name")
        topics.check_name(record.cluster, "cluster name")
        for port, what in ((record.data_port, "data port"),
                           (record.metrics_port, "metrics port")):
            if port is not None and not 0 < port < 65536:
                raise InvalidInput(f"{what} {port} is not a TCP port (1-65535)")
        self.record = record
        instance = _instance("agent", record.device, record.cluster)
        info = ServiceInfo(SERVICE, f"{instance}.{SERVICE}",
                           addresses=[_packed(record.host, "agent")], port=record.data_port,
                           properties=record.properties(),
                           server=_hostname("agent", record.cluster, record.device))
        self._registration = _Registration(
            info, interfaces, f"device {record.device!r} of cluster {record.cluster!r}")


class BrokerAdvertiser(_Advertised):
    """Advertises a cluster's broker (``mqtt://`` or ``mqtts://``) as ``_mqtt._tcp.local.``."""

    def __init__(self, uri: str, cluster: str, interfaces: Sequence[str] | None = None) -> None:
        topics.check_name(cluster, "cluster name")
        parts = urlsplit(uri)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not parts.port:
            raise InvalidInput(f"broker URI {uri!r} must look like mqtt://HOST:PORT "
                               f"or mqtts://HOST:PORT")
        self.uri = uri
        self.cluster = cluster
        info = ServiceInfo(BROKER_SERVICE,
                           f"{_instance('broker', 'edgeswarm-broker', cluster)}.{BROKER_SERVICE}",
                           addresses=[_packed(parts.hostname, "broker")], port=parts.port,
                           properties={"txtvers": TXT_VERSION, "cluster": cluster, "uri": uri},
                           server=_hostname("broker", cluster, uri))
        self._registration = _Registration(info, interfaces,
                                           f"the broker of cluster {cluster!r}")


def _port(text: str | None, what: str) -> int:
    if text is None or not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{what} {text!r} is not a TCP port")
    return int(text)


def parse_agent(properties: Mapping[str, str | None], addresses: Sequence[str]) -> AgentRecord:
    """An AgentRecord from a TXT record and the service's addresses; ValueError if malformed."""
    def text(key: str) -> str:
        value = properties.get(key)
        if not value:
            raise ValueError(f"TXT key {key!r} is missing")
        return value

    if not addresses:
        raise ValueError("the service has no address")
    device = topics.check_name(text("device"), "device name")
    cluster = topics.check_name(text("cluster"), "cluster name")
    metrics = properties.get("metrics_port")
    ipv4 = [a for a in addresses if ":" not in a]
    return AgentRecord(device=device, cluster=cluster, version=text("version"),
                       host=(ipv4 or list(addresses))[0],
                       data_port=_port(properties.get("data_port"), "data_port"),
                       broker=text("broker"),
                       metrics_port=_port(metrics, "metrics_port") if metrics else None)


def browse(cluster: str | None = None, timeout_s: float = 2.0,
           interfaces: Sequence[str] | None = None, expect: int | None = None,
           expect_brokers: int | None = None) -> tuple[list[AgentRecord], list[str]]:
    """Agents (sorted by cluster, device) and broker URIs found within ``timeout_s``.

    Only records of ``cluster`` when given. Returns as soon as ``expect`` agents and
    ``expect_brokers`` broker URIs were found (either may be None: not waited for; both
    None: the whole ``timeout_s``).
    """
    if cluster is not None:
        topics.check_name(cluster, "cluster name")
    events: queue.SimpleQueue[tuple[str, str, ServiceStateChange]] = queue.SimpleQueue()

    def on_change(zeroconf: Zeroconf, service_type: str, name: str,
                  state_change: ServiceStateChange) -> None:
        events.put((service_type, name, state_change))

    agents: dict[str, AgentRecord] = {}
    brokers: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    zc = _zeroconf(interfaces, unicast=True)
    try:
        browser = ServiceBrowser(zc, [SERVICE, BROKER_SERVICE], handlers=[on_change])
        try:
            for _ in range(_MAX_EVENTS):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or _enough(agents, brokers, expect, expect_brokers):
                    break
                try:
                    service_type, name, change = events.get(timeout=remaining)
                except queue.Empty:
                    break
                found = agents if service_type == SERVICE else brokers
                if change is ServiceStateChange.Removed:
                    found.pop(name, None)
                    continue
                info = zc.get_service_info(service_type, name,
                                           timeout=max(1, int(remaining * 1000)))
                if info is None:
                    continue
                props = info.decoded_properties
                try:
                    if service_type == SERVICE:
                        record = parse_agent(props, info.parsed_scoped_addresses())
                        if cluster in (None, record.cluster):
                            agents[name] = record
                    elif props.get("cluster") and cluster in (None, props["cluster"]):
                        uri = props.get("uri")
                        if not uri or urlsplit(uri).scheme not in ("mqtt", "mqtts"):
                            raise ValueError(f"broker URI {uri!r} is not mqtt(s)://")
                        brokers[name] = uri
                except ValueError as exc:  # InvalidInput is a ValueError too
                    log.debug("ignoring the record of %s: %s", name, exc)
        finally:
            browser.cancel()
    finally:
        zc.close()
    found_agents = sorted(agents.values(), key=lambda r: (r.cluster, r.device))
    return found_agents, _broker_uris(brokers, found_agents)


def _broker_uris(brokers: Mapping[str, str], agents: Sequence[AgentRecord]) -> list[str]:
    """Advertised brokers first, then the ones agents use, each once."""
    return list(dict.fromkeys([*brokers.values(), *(r.broker for r in agents)]))


def _enough(agents: Mapping[str, AgentRecord], brokers: Mapping[str, str],
            expect: int | None, expect_brokers: int | None) -> bool:
    if expect is None and expect_brokers is None:
        return False
    return ((expect is None or len(agents) >= expect)
            and (expect_brokers is None
                 or len(_broker_uris(brokers, list(agents.values()))) >= expect_brokers))
