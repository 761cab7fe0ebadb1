"""``edgeswarm bench compression``: the JSON the issue names, the plot, the targets' reading."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgeswarm.bench import compression as bench
from edgeswarm.cli import app
from edgeswarm.models.codecs.train import LearnedRecipe

POINT_KEYS = {"codec", "setting", "bytes_per_sample", "accuracy", "encode_ms", "decode_ms"}


@pytest.mark.slow
def test_bench_compression_json_and_plot(tmp_path):
    plot = tmp_path / "curve.png"
    beta = str(LearnedRecipe().beta)  # cached by the codec tests' fixture or an earlier run
    result = CliRunner().invoke(app, ["bench", "compression", "--json", "--samples", "60",
                                      "--timed", "5", "--beta", beta, "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) == {"points", "teacher_accuracy"}
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
