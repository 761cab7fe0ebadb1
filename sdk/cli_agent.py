"""The device-agent commands: ``edgeswarm agent``, ``edgeswarm devices``, ``edgeswarm keygen``
and ``edgeswarm bench agent``.

Registered on the app in :mod:`edgeswarm.cli`. The agent modules are imported inside the
commands, so the rest of the CLI starts without the ``agent`` extra installed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgeswarm.placement.errors import InvalidInput

err = Console(stderr=True)
out = Console()

log = logging.getLogger("edgeswarm.agent")

KEY_ENV = "EDGESWARM_KEY_FILE"


def default_key_file() -> Path:
    """``$EDGESWARM_KEY_FILE``, else ``~/.config/edgeswarm/cluster.key``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeswarm" / "cluster.key"


def agent_cmd(
        name: str = typer.Option(..., "--name", "-n", help="This device's id in the cluster."),
        cluster: str = typer.Option("default", "--cluster", "-c", help="Cluster name."),
        broker: str | None = typer.Option(
            None, "--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT. Without it and "
                                   "without --embedded-broker, found through zeroconf."),
        embedded_broker: bool = typer.Option(
            False, "--embedded-broker", help="Run the cluster's broker in this agent "
                                             "(amqtt, advertised through zeroconf)."),
        broker_port: int = typer.Option(1883, "--broker-port",
                                        help="Port of the embedded broker (0: a free one)."),
        key_file: Path | None = typer.Option(
            None, "--key-file", help=f"Cluster key (edgeswarm keygen); default ${KEY_ENV} "
                                     f"or ~/.config/edgeswarm/cluster.key."),
        speed: float = typer.Option(1.0, "--speed", help="Compute speed factor (< 1 emulates "
                                                         "a slower device)."),
        prefer_runtime: list[str] | None = typer.Option(
            None, "--prefer-runtime", help="A runtime this device is built for, listed first "
                                           "in its profile (repeatable; snn: spiking "
                                           "hardware)."),
        link: str | None = typer.Option(
            None, "--link", help="Emulate this link to every peer, e.g. 100mbit:5ms (testbed; "
                                 "shaped in the data plane on send)."),
        link_to: list[str] | None = typer.Option(
            None, "--link-to", help="PEER=SPEC: emulate this link to one peer (repeatable; "
                                    "wins over --link)."),
        data_host: str = typer.Option(
            "127.0.0.1", "--data-host", help="This device's address on the data network: "
                                             "gloo, the data probe, the embedded broker and "
                                             "the metrics endpoint bind to it."),
        data_port: int = typer.Option(
            0, "--data-port", help="Port of the data probe (TCP echo the coordinator uses to "
                                   "check reachability and measure the link; 0: a free one)."),
        metrics_port: int | None = typer.Option(
            None, "--metrics-port", help="Serve Prometheus metrics on this port (0: a free one)."),
        tls_ca: Path | None = typer.Option(None, "--tls-ca", help="CA file that signed the "
                                                                  "broker's certificate."),
        tls_cert: Path | None = typer.Option(None, "--tls-cert", help="Client certificate."),
        tls_key: Path | None = typer.Option(None, "--tls-key", help="Client certificate key."),
        username: str | None = typer.Option(None, "--username", help="Broker user name."),
        password_file: Path | None = typer.Option(None, "--password-file",
                                                  help="File holding the broker password."),
        interfaces: list[str] | None = typer.Option(
            None, "--interface", help="Address zeroconf uses (repeatable; 127.0.0.1 on "
                                      "loopback). Default: every interface."),
        no_advertise: bool = typer.Option(False, "--no-advertise",
                                          help="Do not advertise through zeroconf."),
        heartbeat: float = typer.Option(0.5, "--heartbeat", help="Heartbeat period (s)."),
        artifacts_dir: Path | None = typer.Option(
            None, "--artifacts-dir", help="Artifact cache (default ~/.cache/edgeswarm/artifacts)."),
) -> None:
    """Run the device agent until SIGTERM or Ctrl-C (logs to stderr)."""
    from edgeswarm.device_agent import keys
    from edgeswarm.device_agent.agent import Agent, AgentConfig

    _daemon_logging()
    key_path = key_file or default_key_file()
    key = keys.read(key_path)
    try:
        config = AgentConfig(
            name=name, cluster=cluster, broker=broker, embedded_broker=embedded_broker,
            broker_port=broker_port, key=key_path, speed=speed,
            prefer_runtimes=prefer_runtime or [], links=_links(link, link_to or []),
            data_host=data_host,
            data_port=data_port, metrics_port=metrics_port, tls_ca=tls_ca, tls_cert=tls_cert,
            tls_key=tls_key, username=username, password_file=password_file,
            heartbeat_s=heartbeat, interfaces=interfaces or None, advertise=not no_advertise,
            artifacts_dir=artifacts_dir)
    except ValueError as exc:  # pydantic's ValidationError
        raise InvalidInput(f"agent options: {_first_error(exc)}") from None
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    Agent(config, key).run(stop)


def main() -> None:
    """``edgeswarm agent`` alone, as ``python -c "from edgeswarm.cli_agent import main;
    main()" --name ...``: how the testbed starts its agents (:mod:`edgeswarm.testbed_agents`).
    The same command and options, without the rest of the CLI, whose modules (benchmarks,
    placement tools) cost each agent ~0.07 s of CPU to import here: N agents starting on a
    few cores pay that N times over. Errors are printed as by :func:`edgeswarm.cli.main`."""
    import sys

    from edgeswarm.placement.errors import Error

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(agent_cmd)
    try:
        app()
    except Error as exc:
        err.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False,
                  soft_wrap=True)
        sys.exit(2)


def devices_cmd(
        cluster: str | None = typer.Option(None, "--cluster", "-c",
                                           help="Only this cluster."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        timeout: float = typer.Option(2.0, "--timeout", help="Seconds to listen."),
        interfaces: list[str] | None = typer.Option(
            None, "--interface", help="Address zeroconf uses (repeatable; 127.0.0.1 on "
                                      "loopback). Default: every interface."),
) -> None:
    """Find agents and brokers on the network through zeroconf (no configuration)."""
    from edgeswarm.device_agent import discovery

    if timeout <= 0:
        raise InvalidInput(f"--timeout must be > 0, got {timeout}")
    with err.status(f"browsing for {timeout:.1f} s"):
        agents, brokers = discovery.browse(cluster, timeout_s=timeout,
                                           interfaces=interfaces or None)
    if as_json:
        typer.echo(json.dumps({"agents": [dataclasses.asdict(a) for a in agents],
                               "brokers": brokers}, indent=2))
        return
    table = Table("device", "cluster", "host", "data port", "metrics port", "version", "broker",
                  title=f"{len(agents)} agent(s)")
    for a in agents:
        table.add_row(escape(a.device), escape(a.cluster), escape(a.host), str(a.data_port),
                      "-" if a.metrics_port is None else str(a.metrics_port),
                      escape(a.version), escape(a.broker))
    out.print(table)
    out.print(f"brokers: {escape(', '.join(brokers)) if brokers else 'none found'}")


def keygen_cmd(
        output: Path | None = typer.Option(
            None, "--output", "-o", help=f"Key file to write (default ${KEY_ENV} or "
                                         f"~/.config/edgeswarm/cluster.key)."),
        force: bool = typer.Option(False, "--force", help="Replace an existing key file."),
) -> None:
    """Write a new cluster key (32 random bytes, hex, mode 0600)."""
    from edgeswarm.device_agent import keys

    path = output or default_key_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    keys.write(path, keys.generate(), force=force)
    out.print(f"wrote {escape(str(path))}: copy it to every device of the cluster over a "
              f"secure channel (it signs every command)", highlight=False)


def bench_agent_cmd(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        agents: int = typer.Option(4, "--agents", help="Agent processes to discover."),
        kills: int = typer.Option(3, "--kills", help="kill -9 measurements (< --agents)."),
        pings: int = typer.Option(200, "--pings", help="Pings per broker."),
) -> None:
    """The daemon on this machine: discovery time, kill -9 to lost, signed ping latency."""
    from edgeswarm.bench import agent as bench

    with err.status("benchmarking the agent") as status:
        result = bench.run(agents=agents, kills=kills, pings=pings,
                           progress=lambda msg: status.update(msg))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    table = Table("figure", "value", title=f"agent: {agents} agents on loopback")
    d, lost = result["discovery_s"], result["lost_s"]
    table.add_row("discovery, MQTT (spawn -> all online)", _s(d["mqtt"]))
    table.add_row("discovery, zeroconf (spawn -> all browsed)", _s(d["zeroconf"]))
    table.add_row(f"kill -9 -> lost (mean of {kills})", _s(lost["mean"]))
    table.add_row("kill -9 -> lost (max)", _s(lost["max"]))
    for broker, p in result["ping_ms"].items():
        if p.get("error"):
            table.add_row(f"signed ping via {broker}", f"[red]{escape(p['error'])}[/red]")
            continue
        table.add_row(f"signed ping via {broker} (p50 / p99)",
                      f"{p['p50']:.3f} / {p['p99']:.3f} ms")
    out.print(table)


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} s"


def _links(default: str | None, per_peer: list[str]) -> dict[str, Any]:
    """``--link`` (stored under "*") and ``--link-to PEER=SPEC`` as AgentConfig.links."""
    from edgeswarm.device_agent.manifest import parse_link

    links = {} if default is None else {"*": parse_link(default)}
    for item in per_peer:
        peer, sep, spec = item.partition("=")
        if not sep or not peer.strip():
            raise InvalidInput(f"--link-to {item!r}: expected PEER=SPEC, e.g. pi-1=10mbit:20ms")
        links[peer.strip()] = parse_link(spec)
    return links


def _daemon_logging() -> None:
    """INFO and timestamps for the daemon (the root callback set WARNING, or DEBUG with -v)."""
    logger = logging.getLogger("edgeswarm")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))


def _first_error(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        items = errors()
        if items:
            first = items[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "config"
            return f"{where}: {first.get('msg', exc)}"
    return str(exc)
