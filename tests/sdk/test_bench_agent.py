"""``edgeswarm bench agent``: real agent processes, a small run through the CLI."""

import json

import pytest
from typer.testing import CliRunner

from edgeswarm.bench import agent as bench
from edgeswarm.cli import app
from edgeswarm.placement.errors import Error

runner = CliRunner()


@pytest.mark.slow
def test_bench_agent_json_has_every_figure() -> None:
    result = runner.invoke(app, ["bench", "agent", "--json", "--agents", "2", "--kills", "1",
                                 "--pings", "20"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert 0 < doc["discovery_s"]["mqtt"] < 90
    assert 0 < doc["discovery_s"]["zeroconf"] < 90
    assert len(doc["lost_s"]["samples"]) == 1
    assert 0 < doc["lost_s"]["mean"] <= doc["lost_s"]["max"] < 5
    for broker in ("mosquitto", "embedded"):
        p = doc["ping_ms"][broker]
        assert 0 < p["p50"] <= p["p99"] < 1000, doc


@pytest.mark.parametrize(("agents", "kills", "pings"), [(0, 0, 1), (2, 2, 1), (2, 1, 0)])
def test_bench_agent_refuses_impossible_counts(agents: int, kills: int, pings: int) -> None:
    with pytest.raises(Error, match="bench agent needs"):
        bench.run(agents=agents, kills=kills, pings=pings)
