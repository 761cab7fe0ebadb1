"""``edgeswarm bench compression``: the JSON the issue names, the plot, the targets' reading."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgeswarm.bench import compression as bench
from edgeswarm.bench import compression_e2e as e2e
from edgeswarm.cli import app
from edgeswarm.models.codecs.train import LearnedRecipe

POINT_KEYS = {"codec", "setting", "bytes_per_sample", "accuracy", "encode_ms", "decode_ms"}


@pytest.mark.slow
def test_bench_compression_json_and_plot(tmp_path):
    plot = tmp_path / "curve.png"
    beta = str(LearnedRecipe().beta)  # cached by the codec tests' fixture or an earlier run
    result = CliRunner().invoke(app, ["bench", "compression", "--json", "--samples", "60",
                                      "--timed", "5", "--beta", beta, "--plot", str(plot),
                                      "--skip-e2e"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"points", "teacher_accuracy", "e2e"} and doc["e2e"] is None
    assert 0.5 < doc["teacher_accuracy"] <= 1.0
    for p in doc["points"]:
        assert set(p) == POINT_KEYS, p
        assert 0.0 <= p["accuracy"] <= 1.0 and p["bytes_per_sample"] > 0
        assert p["encode_ms"] >= 0 and p["decode_ms"] >= 0
    by = {(p["codec"], p["setting"]): p for p in doc["points"]}
    settings = {q for c, q in by if c == "jpeg"}
    assert settings == {str(q) for q in bench.JPEG_QUALITIES}
    assert {c for c, _ in by} == {"none", "fp16", "int8", "learned", "png", "jpeg", "webp"}
    fp32, fp16, int8 = by[("none", None)], by[("fp16", None)], by[("int8", None)]
    learned = by[("learned", LearnedRecipe().beta.__str__())]
    assert fp32["bytes_per_sample"] > 32 * 16 * 16 * 4  # raw fp32 plus its header
    assert fp32["bytes_per_sample"] > fp16["bytes_per_sample"] > int8["bytes_per_sample"]
    assert learned["bytes_per_sample"] < int8["bytes_per_sample"] / 10
    assert fp32["accuracy"] == doc["teacher_accuracy"]  # fp32 features are exact
    assert by[("png", None)]["accuracy"] == doc["teacher_accuracy"]  # lossless on 8-bit scenes
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_reads_the_targets_off_the_points():
    def pt(codec, setting, size, acc):
        return {"codec": codec, "setting": setting, "bytes_per_sample": size, "accuracy": acc,
                "encode_ms": 0.1, "decode_ms": 0.1}

    doc = {"teacher_accuracy": 0.92, "points": [
        pt("none", None, 32774.0, 0.92), pt("int8", None, 5000.0, 0.919),
        pt("learned", "1e-05", 300.0, 0.905),   # more than one point below: not counted
        pt("learned", "3e-06", 400.0, 0.912),   # the smallest within one point
        pt("learned", "1e-06", 900.0, 0.915),
        pt("webp", "90", 1500.0, 0.913), pt("webp", "75", 800.0, 0.89),
        pt("jpeg", "95", 2700.0, 0.915), pt("png", None, 8000.0, 0.92)]}
    s = bench.summary(doc)
    assert s["learned"]["setting"] == "3e-06"
    assert s["reduction_vs_fp32"] == pytest.approx(32774 / 400, abs=0.01)
    assert s["input_codec"]["codec"] == "webp" and s["input_codec"]["setting"] == "90"
    assert s["fewer_bytes_than_input_codec"] is True
    assert s["within_tolerance"] is True and s["points_below_teacher"] == pytest.approx(0.8)
    # no learned point within one point: the most accurate one is reported, flagged
    doc["points"] = [p for p in doc["points"] if p["setting"] not in ("3e-06", "1e-06")]
    s = bench.summary(doc)
    assert s["within_tolerance"] is False and s["learned"]["setting"] == "1e-05"
    assert s["points_below_teacher"] == pytest.approx(1.5)
    assert s["input_codec"]["codec"] == "webp" and s["input_codec"]["setting"] == "90"
    doc["points"] = [p for p in doc["points"] if p["codec"] != "learned"]
    assert bench.summary(doc)["learned"] is None


def test_bad_sample_counts_are_refused():
    from edgeswarm.placement.errors import InvalidInput

    with pytest.raises(InvalidInput, match="--samples"):
        bench.run(betas=[LearnedRecipe().beta], samples=0)
    with pytest.raises(InvalidInput, match="--e2e-requests"):
        bench.run(betas=[LearnedRecipe().beta], e2e_requests=0)


E2E_RUN_KEYS = {"codec", "setting", "requests", "latency_ms_p50", "latency_ms_p90",
                "predicted_ms", "bytes_per_request", "accuracy", "agreement", "wrong_results"}


@pytest.mark.slow
def test_the_end_to_end_run_deploys_each_codec_on_two_agents():
    doc = e2e.run(3, codecs=("none", "int8", "learned"))
    assert {k: doc[k] for k in ("link", "devices", "split", "requests")} == {
        "link": "10mbit:20ms", "devices": 2, "split": "conv1", "requests": 3}
    runs = {r["codec"]: r for r in doc["runs"]}
    assert list(runs) == ["none", "int8", "learned"]
    for r in doc["runs"]:
        assert set(r) == E2E_RUN_KEYS, r
        assert r["requests"] == 3 and r["wrong_results"] == 0
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"]
        assert r["predicted_ms"] > 20.0            # the model pays the link's latency once
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0
    assert runs["none"]["agreement"] == 1.0       # no codec: the model's own answers
    assert runs["none"]["setting"] is None and runs["learned"]["setting"] == "1e-05"
    assert runs["none"]["bytes_per_request"] > 32 * 16 * 16 * 4
    assert (runs["none"]["bytes_per_request"] > runs["int8"]["bytes_per_request"]
            > 10 * runs["learned"]["bytes_per_request"])


def test_end_to_end_input_is_checked_before_any_process_starts():
    from edgeswarm.placement.errors import InvalidInput

    with pytest.raises(InvalidInput, match="at least one request"):
        e2e.run(0)
    with pytest.raises(InvalidInput, match="end-to-end codecs must be among"):
        e2e.run(3, codecs=("jpeg",))
    with pytest.raises(InvalidInput, match="link spec"):
        e2e.run(3, link="fast")


def test_the_end_to_end_summary_compares_each_codec_with_none():
    def run(codec, setting, p50):
        return {"codec": codec, "setting": setting, "latency_ms_p50": p50}

    doc = {"runs": [run("none", None, 48.0), run("int8", None, 24.0),
                    run("learned", "1e-05", 21.0)]}
    s = e2e.summary(doc)
    assert s["speedup_vs_none"] == {"int8": 2.0, "learned:1e-05": pytest.approx(2.29)}
    assert s["learned_faster_than_none"] is True
    doc["runs"][2]["latency_ms_p50"] = 50.0
    assert e2e.summary(doc)["learned_faster_than_none"] is False
    assert e2e.summary({"runs": doc["runs"][1:]})["speedup_vs_none"] == {}
