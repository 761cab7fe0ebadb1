"""``edgeswarm bench snn``: the JSON a run prints, and refusals."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgeswarm.cli import app
from edgeswarm.placement.errors import InvalidInput


@pytest.mark.slow
def test_bench_snn_json_has_every_key():
    result = CliRunner().invoke(app, ["bench", "snn", "--json", "-m", "digits-mlp",
                                      "--rounds", "1", "--budget", "0.5"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["grid"] == [1, 2, 4, 8, 16, 32] and doc["threads"] >= 1
    m = doc["models"]["digits-mlp"]
    assert m["ann_macs"] == 64 * 128 + 128 * 64 + 64 * 10
    assert 0.9 < m["ann_accuracy"] <= 1 and m["heldout"] == 450
    # the digits models convert as trained: the reference and the converted ANN are one
    assert m["converted_from"] == "trained"
    assert m["converted_ann_accuracy"] == m["ann_accuracy"]
    assert [r["T"] for r in m["by_T"]] == doc["grid"]
    for row in m["by_T"]:
        assert set(row) >= {"T", "accuracy", "sops", "latency_ms"}
        assert 0 <= row["accuracy"] <= 1 and row["sops"] > 0 and row["latency_ms"] > 0
    sops = [r["sops"] for r in m["by_T"]]
    assert sops == sorted(sops)  # cumulative over the steps
    d = m["dynamic"]
    assert set(d) >= {"accuracy", "mean_T", "sops", "T_max", "latency_ms"}
    assert d["T_max"] == m["timesteps"] and 1 <= d["mean_T"] <= d["T_max"]
    assert 1 <= d["min_steps"] <= d["T_max"] and len(d["fold_min_steps"]) == 5
    chosen = next(r for r in m["by_T"] if r["T"] == m["timesteps"])
    assert d["sops"] <= chosen["sops"]  # stopping early never costs more


def test_bench_snn_refuses_models_that_do_not_convert():
    result = CliRunner().invoke(app, ["bench", "snn", "-m", "minilm"])
    assert isinstance(result.exception, InvalidInput)
    assert "digits-mlp, digits-cnn, scene-cnn" in str(result.exception)
