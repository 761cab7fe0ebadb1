"""Testbed profiles (``edgeswarm.testbed/1``): which devices a testbed starts, how fast each
one computes and which links it emulates.

A profile file is JSON::

    {"format": "edgeswarm.testbed/1",
     "default_link": "100mbit:5ms",
     "devices": [
       {"id": "laptop-1", "speed": 1.0},
       {"id": "pi-1", "speed": 0.25, "memory_bytes": 1073741824,
        "links": {"*": "20mbit:10ms", "laptop-1": "100mbit:2ms"}}]}

``speed`` is the agent's compute speed factor (``edgeswarm agent --speed``). ``links`` are
the device's *outgoing* links by peer id (``"coordinator"`` is the pipeline's rank 0, ``"*"``
every peer not named); a device without a ``"*"`` entry uses ``default_link``. The shape of
``a -> b`` is ``a``'s entry for ``b``, else ``a``'s ``"*"``. Link specs are
:func:`~edgeswarm.device_agent.manifest.parse_link`'s (``100mbit:5ms``). ``memory_bytes`` is
recorded for planners and status; the agents do not enforce it.

Built-in profiles: ``uniform`` (every device ``dev-N`` at speed 1.0) and ``mixed`` (laptop
1.0, jetson 0.6, phone 0.4, pi 0.25, cycling: ``laptop-1, jetson-1, phone-1, pi-1,
laptop-2, ...``). Pure: nothing here starts a process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Final, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from edgeswarm.device_agent.manifest import parse_link
from edgeswarm.device_agent.protocol import Model
from edgeswarm.device_agent.topics import NAME_PATTERN
from edgeswarm.placement.errors import InvalidInput

FORMAT: Final = "edgeswarm.testbed/1"
DEFAULT_LINK = "100mbit:5ms"
BUILTIN = ("uniform", "mixed")
DEFAULT_DEVICES = 4

# kind, speed, memory (bytes) of the built-in "mixed" profile, in the order devices cycle
MIXED_KINDS: tuple[tuple[str, float, int], ...] = (
    ("laptop", 1.0, 8 << 30),
    ("jetson", 0.6, 4 << 30),
    ("phone", 0.4, 3 << 30),
    ("pi", 0.25, 1 << 30),
)


def check_link(spec: str) -> str:
    """``spec`` if it is a valid link spec; InvalidInput naming it otherwise."""
    parse_link(spec)
    return spec


def check_links(links: dict[str, str]) -> dict[str, str]:
    """A ``{peer id or "*": spec}`` table, every key and spec checked."""
    for peer, spec in links.items():
        if peer != "*" and re.fullmatch(NAME_PATTERN, peer) is None:
            raise InvalidInput(f"links: {peer!r} is not a device id (or '*' for every peer)")
        check_link(spec)
    return links


class TestbedDevice(Model):
    """One device of a testbed: an agent process with these emulation knobs."""

    __test__ = False  # not a pytest test class

    id: str = Field(pattern=rf"^{NAME_PATTERN}$")
    speed: float = Field(default=1.0, gt=0)
    memory_bytes: int | None = Field(default=None, ge=0)   # recorded, not enforced
    links: dict[str, str] = Field(default_factory=dict)    # peer id or "*" -> link spec

    @field_validator("links")
    @classmethod
    def _links(cls, links: dict[str, str]) -> dict[str, str]:
        return check_links(links)


class TestbedProfile(Model):
    """The devices of a testbed and the link of every device that names none."""

    __test__ = False

    format: Literal["edgeswarm.testbed/1"] = FORMAT
    devices: list[TestbedDevice] = Field(min_length=1)
    default_link: str = DEFAULT_LINK

    @field_validator("default_link")
    @classmethod
    def _default_link(cls, spec: str) -> str:
        return check_link(spec)

    @model_validator(mode="after")
    def _unique(self) -> TestbedProfile:
        seen: set[str] = set()
        for i, device in enumerate(self.devices):
            if device.id in seen:
                raise ValueError(f"devices[{i}].id: {device.id!r} appears twice")
            seen.add(device.id)
        return self

    def links_of(self, device: TestbedDevice) -> dict[str, str]:
        """The device's outgoing links with the default under "*" unless it names its own."""
        return {"*": self.default_link, **device.links}


def builtin(name: str, devices: int = DEFAULT_DEVICES,
            default_link: str = DEFAULT_LINK) -> TestbedProfile:
    """The built-in profile ``name`` ("uniform" or "mixed") with ``devices`` devices."""
    if devices < 1:
        raise InvalidInput(f"a testbed needs at least 1 device, got {devices}")
    if name == "uniform":
        specs = [TestbedDevice(id=f"dev-{i + 1}") for i in range(devices)]
    elif name == "mixed":
        specs = []
        for i in range(devices):
            kind, speed, memory = MIXED_KINDS[i % len(MIXED_KINDS)]
            specs.append(TestbedDevice(id=f"{kind}-{i // len(MIXED_KINDS) + 1}", speed=speed,
                                       memory_bytes=memory))
    else:
        raise InvalidInput(f"unknown built-in testbed profile {name!r}; use one of "
                           f"{', '.join(BUILTIN)} or a profile file")
    return TestbedProfile(devices=specs, default_link=check_link(default_link))


def parse_profile(text: str | bytes, source: str = "testbed profile") -> TestbedProfile:
    """A profile from its JSON text; InvalidInput naming ``source`` and the bad field."""
    hint = f"see docs/testbed.md for the {FORMAT} format"
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InvalidInput(f"{source} is not JSON: {e}; {hint}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InvalidInput(f"{source}: 'format' must be {FORMAT!r}, found {found!r}; {hint}")
    try:
        return TestbedProfile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        raise InvalidInput(f"{source}: {where.lstrip('.') or 'the document'}: {message}{more}; "
                           f"{hint}") from None


def read_profile(path: str | Path) -> TestbedProfile:
    """Read and check a profile file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read testbed profile {p}: {e.strerror or e}") from None
    return parse_profile(text, source=f"testbed profile {p}")


def load_profile(profile: str | Path = "mixed", devices: int | None = None,
                 link: str | None = None) -> TestbedProfile:
    """A built-in profile by name, or a profile file, cut to ``devices`` devices.

    ``devices`` defaults to 4 for a built-in profile and to every device of a file (a file
    cannot grow: asking for more devices than it lists is an error). ``link`` replaces the
    profile's ``default_link``.
    """
    if isinstance(profile, str) and profile in BUILTIN:
        return builtin(profile, DEFAULT_DEVICES if devices is None else devices,
                       DEFAULT_LINK if link is None else link)
    path = Path(profile)
    if not path.exists() and isinstance(profile, str) and "." not in path.name:
        raise InvalidInput(f"unknown testbed profile {profile!r}: not one of "
                           f"{', '.join(BUILTIN)} and no such file")
    loaded = read_profile(path)
    n = len(loaded.devices) if devices is None else devices
    if not 1 <= n <= len(loaded.devices):
        raise InvalidInput(f"testbed profile {path} describes {len(loaded.devices)} devices; "
                           f"cannot start {n} (give --devices 1..{len(loaded.devices)})")
    return TestbedProfile(devices=loaded.devices[:n],
                          default_link=loaded.default_link if link is None else check_link(link))
