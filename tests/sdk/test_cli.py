import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import edgeswarm
from edgeswarm.cli import app

runner = CliRunner()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point, in a subprocess, as a user runs it."""
    code = "from edgeswarm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"edgeswarm {edgeswarm.__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("models", "graph", "compile", "demo", "bench"):
        assert command in result.stdout


def test_models_lists_the_zoo_as_json():
    result = runner.invoke(app, ["models", "--json"])
    assert result.exit_code == 0
    assert set(json.loads(result.stdout)) == {"digits-mlp", "digits-cnn", "scene-cnn", "minilm",
                                              "smollm2"}


def test_graph_json_is_the_interchange_format():
    result = runner.invoke(app, ["graph", "digits-cnn", "--json"])
    assert result.exit_code == 0, result.stdout
    graph = edgeswarm.TaskGraph.from_json(result.stdout)
    assert graph.tasks[0].kind == "input" and any(t.kind == "conv" for t in graph.tasks)
    table = runner.invoke(app, ["graph", "digits-cnn"])
    assert table.exit_code == 0 and "conv" in table.stdout


@pytest.mark.parametrize("args, message", [
    (["graph", "resnet-9000"], "unknown model 'resnet-9000'"),
    (["compile", "digits-mlp", "--runtime", "tensorrt", "-o", "x.onnx"], "unknown runtime"),
    (["compile", "missing.onnx", "--runtime", "onnx", "-o", "y.onnx"], "does not exist"),
])
def test_bad_input_is_one_line_naming_the_problem(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr


def test_compile_writes_an_artifact_that_loads(tmp_path):
    target = tmp_path / "mlp.int8.onnx"
    result = _cli("compile", "digits-mlp", "--runtime", "onnx-int8", "-o", str(target))
    assert result.returncode == 0, result.stderr
    from edgeswarm.models.runtimes import load

    assert load(target).runtime == "onnx-int8"
