"""``edgeswarm testbed``: N agent processes on this machine with emulated speeds and links,
a live status table, scripted churn; stops cleanly on Ctrl-C or SIGTERM.

Registered on the app in :mod:`edgeswarm.cli`; the testbed modules are imported inside the
command, so the rest of the CLI starts without the ``agent`` extra.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from edgeswarm.cli_agent import _first_error
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.quiet import quiet

if TYPE_CHECKING:
    from edgeswarm.testbed import AgentStatus, Testbed

err = Console(stderr=True)
out = Console()

REFRESH_S = 0.5
_COLOURS = {"online": "green", "starting": "yellow", "left": "blue", "lost": "red",
            "exited": "red"}


def testbed_cmd(
        devices: int | None = typer.Option(
            None, "--devices", "-n", help="Agents to start (default 4 for a built-in profile, "
                                          "every device of a profile file)."),
        profile: str = typer.Option(
            "mixed", "--profile", "-p", help="mixed (laptop/jetson/phone/pi speeds), uniform, "
                                             "or an edgeswarm.testbed/1 JSON file."),
        link: str | None = typer.Option(
            None, "--link", help="Default emulated link, e.g. 100mbit:5ms (replaces the "
                                 "profile's default_link)."),
        churn: Path | None = typer.Option(
            None, "--churn", help="Churn script: lines like 'at 3.0 kill pi-1', "
                                  "'at 6 join pi-9 speed=0.3 link=10mbit:20ms'."),
        broker: str | None = typer.Option(
            None, "--broker", help="Use this MQTT broker (mqtt://HOST:PORT) instead of the "
                                   "embedded one."),
        cluster: str = typer.Option("testbed", "--cluster", "-c", help="Cluster name."),
        key_file: Path | None = typer.Option(
            None, "--key-file", help="Cluster key to use (written there if missing; default: a "
                                     "new key in a temporary directory)."),
        json_status: bool = typer.Option(
            False, "--json-status", help="Print JSON lines (ready, status changes, churn, "
                                         "stopped) instead of the live table."),
        duration: float | None = typer.Option(
            None, "--duration", help="Stop by itself after this many seconds (once up)."),
) -> None:
    """Start a simulated edge testbed of ordinary agent processes until Ctrl-C."""
    from edgeswarm.testbed import Testbed, TestbedConfig
    from edgeswarm.testbed_churn import check_churn, read_churn
    from edgeswarm.testbed_profile import load_profile

    if duration is not None and not duration > 0:
        raise InvalidInput(f"--duration must be > 0 seconds, got {duration}")
    spec = load_profile(profile, devices, link)
    events = read_churn(churn) if churn is not None else []
    check_churn(events, [d.id for d in spec.devices])
    try:
        config = TestbedConfig(profile=spec, cluster=cluster, broker=broker, key_file=key_file)
    except ValueError as exc:  # pydantic's ValidationError
        raise InvalidInput(f"testbed options: {_first_error(exc)}") from None
    stop = threading.Event()
    up = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        first = not stop.is_set()
        stop.set()
        if first and not up.is_set():  # interrupt start(): it stops what it started
            raise KeyboardInterrupt(signal.Signals(signum).name)

    tb = Testbed(config)
    with _signals(on_signal), quiet("edgeswarm.agent.coordinator", "edgeswarm.testbed"):
        try:
            if json_status:
                tb.start()
            else:
                with err.status(f"starting {len(spec.devices)} agents on {config.host}"):
                    tb.start()
        except KeyboardInterrupt:
            err.print("interrupted while starting: stopped")
            return
        up.set()
        try:
            _serve(tb, events, stop, duration, json_status)
        finally:
            tb.stop()
    if json_status:
        _emit({"event": "stopped"})
    else:
        err.print("testbed stopped")


def _serve(tb: Testbed, events: list[Any], stop: threading.Event, duration: float | None,
           json_status: bool) -> None:
    log: list[str] = []
    t0 = time.monotonic()

    def note(line: str) -> None:
        log.append(f"{time.monotonic() - t0:7.2f} s  {line}")
        del log[:-8]
        if json_status:
            _emit({"event": "log", "t": round(time.monotonic() - t0, 3), "message": line})

    def on_churn(at: float, event: Any) -> None:
        note(f"churn line {event.line}: {type(event).__name__.lower()} {event.device}")

    statuses = tb.status()
    if json_status:
        _emit({"event": "ready", **_connection(tb), "devices": [_row(s) for s in statuses]})
    else:
        out.print(_banner(tb))
    run = tb.run_churn(events, on_event=on_churn) if events else None
    seen = {s.name: (s.status, s.alive) for s in statuses}
    reported = len(run.errors) if run is not None else 0

    def refresh() -> list[AgentStatus]:
        nonlocal reported
        now = tb.status()
        changed = False
        for s in now:
            before = seen.get(s.name)
            if before != (s.status, s.alive):
                if before is None or before[0] != s.status:
                    note(f"{s.name}: {'new' if before is None else before[0]} -> {s.status}")
                seen[s.name] = (s.status, s.alive)
                changed = True
        if run is not None:
            for event, why in run.errors[reported:]:
                note(f"churn line {event.line} failed: {why}")
            reported = len(run.errors)
        if json_status and changed:
            _emit({"event": "status", "devices": [_row(s) for s in now]})
        return now

    def running() -> bool:
        return not stop.wait(REFRESH_S) and (duration is None
                                             or time.monotonic() - t0 < duration)

    if json_status:
        while running():
            refresh()
        return
    from rich.live import Live

    with Live(_render(statuses, log), console=out, refresh_per_second=4,
              transient=False) as live:
        while running():
            live.update(_render(refresh(), log))


def _connection(tb: Testbed) -> dict[str, Any]:
    return {"broker": tb.broker_uri, "cluster": tb.cluster, "key_file": str(tb.key_file),
            "key_file_temporary": tb.config.key_file is None,
            "up_s": None if tb.up_s is None else round(tb.up_s, 3)}


def _banner(tb: Testbed) -> Text:
    c = _connection(tb)
    temporary = c["key_file_temporary"]
    return Text.from_markup(
        f"testbed [bold]{escape(tb.cluster)}[/bold]: {len(tb.names)} agents up in "
        f"{c['up_s']:.2f} s\n"
        f"  broker   {escape(c['broker'])}\n  cluster  {escape(c['cluster'])}\n"
        f"  key file {escape(c['key_file'])}"
        + (" (temporary: removed when the testbed stops)" if temporary else "") + "\n"
        f"  connect: edgeswarm.Cluster.connect({c['broker']!r}, cluster={c['cluster']!r}, "
        f"key={c['key_file']!r})\n"
        "Ctrl-C stops every agent.")


def _row(s: AgentStatus) -> dict[str, Any]:
    return {"name": s.name, "pid": s.pid, "alive": s.alive, "status": s.status,
            "speed": s.speed, "links": s.links, "deployments": list(s.deployments),
            "heartbeat_age_s": None if s.heartbeat_age_s is None else round(s.heartbeat_age_s, 3),
            "exit_code": s.exit_code}


def _render(statuses: list[AgentStatus], log: list[str]) -> Group:
    table = Table("device", "pid", "speed", "link", "status", "deployments", "heartbeat",
                  title=f"{sum(s.online for s in statuses)} of {len(statuses)} online")
    for s in statuses:
        others = len(s.links) - ("*" in s.links)
        link = s.links.get("*", "-") + (f" +{others}" if others else "")
        colour = _COLOURS.get(s.status, "white")
        age = "-" if s.heartbeat_age_s is None else f"{s.heartbeat_age_s:.1f} s ago"
        table.add_row(escape(s.name), str(s.pid), f"{s.speed:g}", escape(link),
                      f"[{colour}]{s.status}[/{colour}]",
                      escape(", ".join(s.deployments)) or "-", age)
    return Group(table, Text("\n".join(log), style="dim"))


def _emit(doc: dict[str, Any]) -> None:
    typer.echo(json.dumps(doc))


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


