import json

from typer.testing import CliRunner

from edgeswarm.bench.timing import interleaved, median
from edgeswarm.cli import app


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_interleaved_alternates_and_respects_the_budget():
    clock = _Clock()
    order: list[str] = []

    def call(name: str, cost: float):
        def run() -> None:
            order.append(name)
            clock.t += cost
        return run

    samples = interleaved([call("a", 1.0), call("b", 2.0)], rounds=100, budget_s=7.5, clock=clock)
    assert order[:4] == ["a", "b", "a", "b"]
    assert len(samples[0]) == len(samples[1]) == 3  # 3 s a round; stops after passing 7.5 s
    assert samples[0] == [1.0, 1.0, 1.0] and samples[1] == [2.0, 2.0, 2.0]
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_bench_runtimes_json_has_every_key():
    result = CliRunner().invoke(app, ["bench", "runtimes", "--json", "-m", "digits-mlp",
                                      "-r", "torch", "-r", "onnx", "-r", "onnx-int8",
                                      "--rounds", "3", "--budget", "2"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["threads"] >= 1
    rows = {r["runtime"]: r for r in doc["results"]}
    assert set(rows) == {"torch", "onnx", "onnx-int8"}
    for r in rows.values():
        assert r["error"] is None
        assert set(r) >= {"model", "runtime", "accuracy", "latency_ms_b1", "throughput_b32",
                          "size_bytes"}
        assert r["accuracy"] > 0.9 and r["latency_ms_b1"] > 0 and r["throughput_b32"] > 0
    assert rows["onnx-int8"]["size_bytes"] < rows["onnx"]["size_bytes"]
    summary = doc["models"]["digits-mlp"]
    assert summary["int8_speedup"] > 0
    assert summary["int8_accuracy_drop"] == round(
        rows["onnx"]["accuracy"] - rows["onnx-int8"]["accuracy"], 5)
