"""Cluster: the devices present now and the links between them.

Pure data, serialized as ``edgeswarm.cluster/1``. A link given once holds both ways
unless the reverse is also given; pairs not listed use ``default_link``, and without one
every pair must be listed (an unreachable pair is an error naming it).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NewType

from edgeswarm.placement.errors import InvalidInput

DeviceId = NewType("DeviceId", str)

FORMAT = "edgeswarm.cluster/1"


@dataclass(frozen=True)
class Device:
    """A device as the planner sees it: compute speed (FLOP/s), memory, runtimes."""

    id: DeviceId
    flops: float
    memory_bytes: int
    runtimes: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "flops": self.flops,
                               "memory_bytes": self.memory_bytes}
        if self.runtimes is not None:
            out["runtimes"] = list(self.runtimes)
        return out


@dataclass(frozen=True)
class Link:
    """A directed network path: a transfer of b bytes takes latency_s + b / bandwidth_Bps."""

    src: DeviceId
    dst: DeviceId
    bandwidth_Bps: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class LinkSpec:
    """Bandwidth and latency without endpoints (the default link)."""

    bandwidth_Bps: float
    latency_s: float


@dataclass(frozen=True)
class Cluster:
    devices: tuple[Device, ...]
    links: tuple[Link, ...] = ()
    default_link: LinkSpec | None = None
    _by_id: dict[str, Device] = field(default_factory=dict, init=False, repr=False,
                                      compare=False)
    _links: dict[tuple[str, str], Link] = field(default_factory=dict, init=False, repr=False,
                                                compare=False)

    def __post_init__(self) -> None:
        if not self.devices:
            raise InvalidInput("cluster: no devices")
        for d in self.devices:
            if d.id in self._by_id:
                raise InvalidInput(f"cluster: device id {d.id!r} appears twice")
            if not d.flops > 0:
                raise InvalidInput(f"cluster: device {d.id!r} has flops {d.flops}; must be > 0")
            if d.memory_bytes < 0:
                raise InvalidInput(f"cluster: device {d.id!r} has negative memory_bytes")
            self._by_id[d.id] = d
        if self.default_link is not None:
            _check_link_numbers(self.default_link.bandwidth_Bps, self.default_link.latency_s,
                                "default_link")
        explicit: dict[tuple[str, str], Link] = {}
        for ln in self.links:
            for end in (ln.src, ln.dst):
                if end not in self._by_id:
                    raise InvalidInput(f"cluster: link {ln.src}->{ln.dst} names unknown device "
                                       f"{end!r}")
            if ln.src == ln.dst:
                raise InvalidInput(f"cluster: link {ln.src}->{ln.dst} joins a device to itself")
            _check_link_numbers(ln.bandwidth_Bps, ln.latency_s, f"link {ln.src}->{ln.dst}")
            explicit[(ln.src, ln.dst)] = ln
        for (a, b), ln in explicit.items():
            self._links[(a, b)] = ln
            if (b, a) not in explicit:
                self._links[(b, a)] = Link(DeviceId(b), DeviceId(a), ln.bandwidth_Bps,
                                           ln.latency_s)
        if self.default_link is None:
            missing = [(a.id, b.id) for a in self.devices for b in self.devices
                       if a.id != b.id and (a.id, b.id) not in self._links]
            if missing:
                shown = ", ".join(f"{a}->{b}" for a, b in missing[:5])
                raise InvalidInput(
                    f"cluster: no link for {len(missing)} device pair(s) ({shown}) and no "
                    f"default_link: list them or give a default_link")

    # -- queries -------------------------------------------------------------------
    @property
    def ids(self) -> list[DeviceId]:
        return [d.id for d in self.devices]

    def device(self, did: str) -> Device:
        try:
            return self._by_id[did]
        except KeyError:
            raise InvalidInput(f"cluster: unknown device {did!r}; devices are "
                               f"{', '.join(self.ids)}") from None

    def __contains__(self, did: object) -> bool:
        return did in self._by_id

    def link(self, src: str, dst: str) -> LinkSpec:
        """Bandwidth and latency from ``src`` to ``dst`` (infinite bandwidth on one device)."""
        if src == dst:
            return LinkSpec(float("inf"), 0.0)
        ln = self._links.get((src, dst))
        if ln is not None:
            return LinkSpec(ln.bandwidth_Bps, ln.latency_s)
        if self.default_link is None or src not in self._by_id or dst not in self._by_id:
            raise InvalidInput(f"cluster: no link {src}->{dst}")
        return self.default_link

    def transfer_s(self, src: str, dst: str, nbytes: float) -> float:
        if src == dst:
            return 0.0
        spec = self.link(src, dst)
        return spec.latency_s + nbytes / spec.bandwidth_Bps

    # -- changes (each returns a new cluster) ------------------------------------------
    def without(self, ids: Iterable[str]) -> Cluster:
        gone = set(ids)
        unknown = gone - set(self._by_id)
        if unknown:
            raise InvalidInput(f"cluster: cannot remove unknown device(s) {sorted(unknown)}")
        return Cluster(tuple(d for d in self.devices if d.id not in gone),
                       tuple(ln for ln in self.links if ln.src not in gone and ln.dst not in gone),
                       self.default_link)

    def with_devices(self, devices: Iterable[Device], links: Iterable[Link] = ()) -> Cluster:
        """Add (or replace, by id) devices and links."""
        new = list(devices)
        ids = {d.id for d in new}
        kept = tuple(d for d in self.devices if d.id not in ids)
        new_links = list(links)
        pairs = {(ln.src, ln.dst) for ln in new_links} | {(ln.dst, ln.src) for ln in new_links}
        old_links = tuple(ln for ln in self.links if (ln.src, ln.dst) not in pairs)
        return replace(self, devices=kept + tuple(new), links=old_links + tuple(new_links))

    # -- JSON ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "devices": [d.to_json() for d in self.devices],
            "links": [{"src": ln.src, "dst": ln.dst, "bandwidth_Bps": ln.bandwidth_Bps,
                       "latency_s": ln.latency_s} for ln in self.links],
        }
        if self.default_link is not None:
            out["default_link"] = {"bandwidth_Bps": self.default_link.bandwidth_Bps,
                                   "latency_s": self.default_link.latency_s}
        return out

    def dumps(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_json(), indent=indent)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | str) -> Cluster:
        if isinstance(doc, str):
            try:
                doc = json.loads(doc)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"cluster: not JSON ({exc})") from None
        if not isinstance(doc, Mapping):
            raise InvalidInput("cluster: expected a JSON object")
        if doc.get("format") != FORMAT:
            raise InvalidInput(f"cluster: format is {doc.get('format')!r}, expected {FORMAT!r}")
        devices = tuple(_device_from_json(d) for d in _list(doc, "devices"))
        links = tuple(_link_from_json(ln) for ln in _list(doc, "links", required=False))
        default = doc.get("default_link")
        spec = None
        if default is not None:
            if not isinstance(default, Mapping):
                raise InvalidInput("cluster: default_link must be an object")
            spec = LinkSpec(_num(default, "bandwidth_Bps", "default_link"),
                            _num(default, "latency_s", "default_link"))
        return cls(devices, links, spec)


def _check_link_numbers(bandwidth: float, latency: float, where: str) -> None:
    if not bandwidth > 0:
        raise InvalidInput(f"cluster: {where} has bandwidth_Bps {bandwidth}; must be > 0")
    if not latency >= 0:
        raise InvalidInput(f"cluster: {where} has latency_s {latency}; must be >= 0")


def _list(doc: Mapping[str, Any], key: str, required: bool = True) -> list[Any]:
    value = doc.get(key, None if required else [])
    if not isinstance(value, list):
        raise InvalidInput(f"cluster: {key!r} must be a list")
    return value


def _num(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"cluster: {where}.{key} must be a number, got {value!r}")
    return float(value)


def _device_from_json(obj: Any) -> Device:
    if not isinstance(obj, Mapping):
        raise InvalidInput("cluster: each device must be an object")
    did = obj.get("id")
    if not isinstance(did, str) or not did:
        raise InvalidInput(f"cluster: device id must be a non-empty string, got {did!r}")
    where = f"device {did!r}"
    mem = obj.get("memory_bytes")
    if isinstance(mem, bool) or not isinstance(mem, int):
        raise InvalidInput(f"cluster: {where}.memory_bytes must be an integer, got {mem!r}")
    runtimes = obj.get("runtimes")
    if runtimes is not None and not (
            isinstance(runtimes, list) and all(isinstance(r, str) for r in runtimes)):
        raise InvalidInput(f"cluster: {where}.runtimes must be a list of strings")
    return Device(DeviceId(did), _num(obj, "flops", where), mem,
                  tuple(runtimes) if runtimes is not None else None)


def _link_from_json(obj: Any) -> Link:
    if not isinstance(obj, Mapping):
        raise InvalidInput("cluster: each link must be an object")
    src, dst = obj.get("src"), obj.get("dst")
    if not isinstance(src, str) or not isinstance(dst, str):
        raise InvalidInput(f"cluster: link endpoints must be device ids, got {src!r}->{dst!r}")
    where = f"link {src}->{dst}"
    return Link(DeviceId(src), DeviceId(dst), _num(obj, "bandwidth_Bps", where),
                _num(obj, "latency_s", where))
