"""``edgeswarm bench tp``: the matrix, the speedup arithmetic, and one quick real run
through the CLI (JSON shape and outputs against one device; never timings)."""

import json

import pytest
from typer.testing import CliRunner

from edgeswarm.bench import tp
from edgeswarm.cli import app
from edgeswarm.placement.errors import InvalidInput

RUN_KEYS = {"model", "devices", "link", "allreduce", "window", "throughput", "ttft_ms",
            "tpot_ms", "max_abs_diff", "param_bytes_per_device", "peak_rss_bytes"}


def test_the_full_matrix_covers_the_issue():
    cases = tp.matrix()
    for model in tp.MODELS:
        mine = [c for c in cases if c.model == model]
        assert {c.devices for c in mine} == {1, 2, 4}
        assert {c.link for c in mine if c.devices == 2} == set(tp.LINKS)
        assert {c.allreduce for c in mine} >= {"auto", "star", "gloo", "direct"}
        assert {c.window for c in mine if c.devices == 2} == {None, tp.WINDOW}
        assert len(mine) == len(set(mine))
    assert all(c.devices in (1, 2) and c.link == "none" for c in tp.matrix(quick=True))
    with pytest.raises(InvalidInput, match="minilm, smollm2"):
        tp.matrix(models=["gpt2"])


def test_speedup_divides_the_one_device_time_by_the_group_time():
    runs = [{"model": "minilm", "devices": d, "link": "none", "window": None,
             "allreduce": "none" if d == 1 else "auto", "time_s": t}
            for d, t in ((1, 0.3), (2, 0.2))]
    runs.append({"model": "minilm", "devices": 2, "link": "1gbit-1ms", "window": None,
                 "allreduce": "auto", "time_s": 9.0})
    assert tp._speedup(runs, "time_s") == {"minilm": {"2": 1.5, "4": None}}


@pytest.mark.slow
def test_quick_bench_prints_the_json_with_outputs_matching_one_device():
    result = CliRunner().invoke(app, ["bench", "tp", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {"runs", "speedup", "speedup_tpot", "collectives"} <= set(doc)
    assert {r["model"] for r in doc["runs"]} == set(tp.MODELS)
    for run in doc["runs"]:
        assert set(run) >= RUN_KEYS
        assert run["max_abs_diff"] <= 1e-4, run
        assert run["throughput"] > 0
        assert 0 < run["base_rss_bytes"] < run["peak_rss_bytes"]
        if run["model"] == "smollm2":
            assert run["tokens_match"] is True
            assert run["ttft_ms"] > 0 and run["tpot_ms"] > 0
    one = {r["model"]: r for r in doc["runs"] if r["devices"] == 1}
    for run in doc["runs"]:
        if run["devices"] == 2:
            ratio = run["param_bytes_per_device"] / one[run["model"]]["param_bytes_per_device"]
            assert ratio <= 0.55
            if run["window"]:
                assert run["resident_param_bytes"] < run["param_bytes_per_device"]
    assert set(doc["speedup"]) == set(tp.MODELS)
    assert all(c["ms"] > 0 for c in doc["collectives"])
