"""Churn scripts: devices that leave and join a testbed at given times.

One event per line, times in seconds from the start of the run, ``#`` starts a comment::

    # a Pi dies, a new one replaces it, a phone leaves cleanly
    at 3.0 kill pi-1                                 # SIGKILL: the broker sends its last will
    at 6.0 join pi-9 speed=0.3 link=10mbit:20ms      # a new agent process
    at 8   leave phone-1                             # SIGTERM: a clean stop ("offline")

``join`` takes ``speed=`` (default 1.0), ``link=`` (its link to every peer; default the
testbed's) and ``link-PEER=SPEC`` (its link to one peer). Events run in time order (lines
with equal times in file order). :func:`parse_churn` is pure and names the line of any
mistake; :func:`check_churn` checks the names against a testbed's devices;
:func:`run_churn` plays the events on a thread, against anything with ``kill``, ``leave``
and ``join`` (the :class:`~edgeswarm.testbed.Testbed`), with the clock and the sleep passed in.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgeswarm.device_agent.manifest import parse_link
from edgeswarm.device_agent.topics import NAME_PATTERN
from edgeswarm.placement.errors import Error, InvalidInput

log = logging.getLogger("edgeswarm.testbed")

_NAME = re.compile(rf"{NAME_PATTERN}")


@dataclass(frozen=True)
class Kill:
    """SIGKILL the device's agent (no clean stop)."""

    at: float
    device: str
    line: int = 0


@dataclass(frozen=True)
class Leave:
    """SIGTERM the device's agent: it publishes "offline" and stops."""

    at: float
    device: str
    line: int = 0


@dataclass(frozen=True)
class Join:
    """Start a new agent. ``links`` as in a profile (peer or "*" -> spec); empty: the default."""

    at: float
    device: str
    speed: float = 1.0
    links: dict[str, str] = field(default_factory=dict)
    line: int = 0


ChurnEvent = Kill | Leave | Join


def parse_churn(text: str, source: str = "churn script") -> list[ChurnEvent]:
    """The events of a churn script, in time order; InvalidInput naming the line otherwise."""
    events: list[ChurnEvent] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            events.append(_parse_line(line, number, f"{source} line {number}: {line!r}"))
    return sorted(events, key=lambda e: e.at)   # stable: equal times keep file order


def read_churn(path: str | Path) -> list[ChurnEvent]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"cannot read churn script {p}: {getattr(e, 'strerror', None) or e}"
                           ) from None
    return parse_churn(text, source=f"churn script {p}")


def _parse_line(line: str, number: int, where: str) -> ChurnEvent:
    words = line.split()
    if len(words) < 4 or words[0] != "at":
        raise InvalidInput(f"{where}: expected 'at SECONDS kill|leave|join DEVICE [key=value "
                           f"...]'")
    try:
        at = float(words[1])
    except ValueError:
        raise InvalidInput(f"{where}: {words[1]!r} is not a number of seconds") from None
    if not (math.isfinite(at) and at >= 0):
        raise InvalidInput(f"{where}: the time must be a finite number of seconds >= 0")
    action, device, options = words[2], words[3], words[4:]
    if _NAME.fullmatch(device) is None:
        raise InvalidInput(f"{where}: {device!r} is not a device id ([A-Za-z0-9_.-], at "
                           f"most 64)")
    if action in ("kill", "leave"):
        if options:
            raise InvalidInput(f"{where}: {action} takes no options, got {' '.join(options)!r}")
        return Kill(at, device, number) if action == "kill" else Leave(at, device, number)
    if action != "join":
        raise InvalidInput(f"{where}: unknown action {action!r}; use kill, leave or join")
    speed = 1.0
    links: dict[str, str] = {}
    for option in options:
        key, sep, value = option.partition("=")
        try:
            if not sep:
                raise InvalidInput(f"option {option!r} is not key=value")
            if key == "speed":
                speed = float(value)
                if not (math.isfinite(speed) and speed > 0):
                    raise InvalidInput(f"speed must be > 0, got {value!r}")
            elif key == "link":
                parse_link(value)
                links["*"] = value
            elif key.startswith("link-") and _NAME.fullmatch(key[5:]):
                parse_link(value)
                links[key[5:]] = value
            else:
                raise InvalidInput(f"unknown option {key!r}; use speed=, link= or "
                                   f"link-PEER=")
        except ValueError as e:  # InvalidInput too
            raise InvalidInput(f"{where}: {e}") from None
    return Join(at, device, speed, links, number)


def check_churn(events: Sequence[ChurnEvent], running: Sequence[str]) -> None:
    """Check that each kill/leave names a device running then and each join a free name,
    given the devices ``running`` at the start; InvalidInput naming the line otherwise."""
    up = set(running)
    for event in events:
        if isinstance(event, Join):
            if event.device in up:
                raise InvalidInput(f"churn line {event.line}: join {event.device}: a device "
                                   f"of that name is running then; pick another name")
            up.add(event.device)
        elif event.device not in up:
            verb = "kill" if isinstance(event, Kill) else "leave"
            raise InvalidInput(f"churn line {event.line}: {verb} {event.device}: no such "
                               f"device running then (running: {', '.join(sorted(up)) or 'none'})")
        else:
            up.discard(event.device)


class ChurnTarget(Protocol):
    """What a churn script acts on (the Testbed)."""

    def kill(self, name: str) -> None: ...
    def leave(self, name: str) -> None: ...
    def join(self, name: str, speed: float = 1.0, links: dict[str, str] | None = None,
             wait: bool = True) -> None: ...


class ChurnRun:
    """A churn script playing on its own thread. ``applied`` lists ``(seconds from the
    start, event)`` as they ran; ``errors`` the events that failed, with why."""

    def __init__(self, target: ChurnTarget, events: Sequence[ChurnEvent], *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None,
                 on_event: Callable[[float, ChurnEvent], None] | None = None) -> None:
        self.events = list(events)
        self.applied: list[tuple[float, ChurnEvent]] = []
        self.errors: list[tuple[ChurnEvent, str]] = []
        self._target = target
        self._clock = clock
        self._stop = threading.Event()
        self._sleep = sleep if sleep is not None else self._stop.wait
        self._on_event = on_event
        self._thread = threading.Thread(target=self._run, name="edgeswarm-churn", daemon=True)

    def start(self) -> ChurnRun:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop before the next event (one under way finishes first) and join the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def wait(self, timeout_s: float) -> bool:
        """Wait until every event ran (or the run was stopped); True if it has finished."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def _run(self) -> None:
        t0 = self._clock()
        for event in self.events:
            while not self._stop.is_set():
                left = t0 + event.at - self._clock()
                if left <= 0:
                    break
                self._sleep(min(left, 0.5))
            if self._stop.is_set():
                return
            try:
                if isinstance(event, Kill):
                    self._target.kill(event.device)
                elif isinstance(event, Leave):
                    self._target.leave(event.device)
                else:
                    self._target.join(event.device, event.speed, event.links or None, wait=False)
            except Error as exc:
                log.warning("churn line %d failed: %s", event.line, exc)
                self.errors.append((event, str(exc)))
                continue
            at = self._clock() - t0
            self.applied.append((at, event))
            log.info("churn at %.2f s: %s %s", at, type(event).__name__.lower(), event.device)
            if self._on_event is not None:
                self._on_event(at, event)
