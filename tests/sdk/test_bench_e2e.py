"""``edgeswarm bench e2e``: a small run of the bench (two agent processes, few requests)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgeswarm.bench import e2e
from edgeswarm.cli import app
from edgeswarm.placement.errors import InvalidInput


@pytest.mark.slow
def test_a_small_run_measures_every_figure_and_survives_the_kill() -> None:
    (result,) = e2e.run([2], requests=4, batch=8, budget_s=30, churn_s=60, timeout_s=60)
    doc = json.loads(json.dumps([result.summary()]))[0]
    assert tuple(doc) == e2e.KEYS
    assert doc["devices"] == 2 and doc["requests"] == 4
    assert doc["failed_requests"] == 0 and doc["wrong_results"] == 0
    assert doc["discovery_s"] > 0 and doc["deploy_s"] > 0
    assert 0 < doc["p50_ms"] <= doc["p99_ms"]
    assert doc["predicted_ms"] > 0 and doc["measured_ms"] > 0
    assert doc["prediction_error"] == pytest.approx(
        doc["measured_ms"] / doc["predicted_ms"] - 1, abs=1e-3)
    # the churn ran to its end: a recovered result, then AFTER_RECOVERY more
    assert doc["recovery_s"] is not None and doc["recovery_s"] > 0
    assert doc["requests_during_churn"] >= e2e.BEFORE_KILL + 1 + e2e.AFTER_RECOVERY
    churn = result.churn
    assert churn is not None and churn.victim in result.plan
    assert churn.victim not in churn.devices_after and churn.devices_after
    assert f"device {churn.victim} lost" in churn.reason
    assert churn.ready_s is not None and churn.ready_s <= doc["recovery_s"]
    assert set(result.profiles_gflops) == {"laptop-1", "jetson-1"}


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"devices": [1]}, "sizes >= 2"),
    ({"devices": []}, "sizes >= 2"),
    ({"devices": [2], "requests": 0}, "requests >= 1"),
    ({"devices": [2], "link": "9 furlongs"}, "link spec"),
])
def test_impossible_runs_are_refused_before_anything_starts(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        e2e.run(**kwargs)


def test_the_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["bench", "e2e", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--json", "--devices", "--requests", "--batch", "--link"):
        assert option in result.output
