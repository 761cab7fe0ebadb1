"""``edgeswarm place`` and ``edgeswarm simulate`` on small JSON files."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgeswarm.cli import app
from edgeswarm.placement.plan import Plan

runner = CliRunner()

GRAPH = {
    "format": "edgeswarm.taskgraph/1",
    "tasks": [
        {"id": "in", "flops": 1e6, "param_bytes": 0, "out_bytes": 4000},
        {"id": "wide", "flops": 4e8, "param_bytes": 2_000_000, "out_bytes": 4000,
         "splittable": True},
        {"id": "side", "flops": 2e8, "param_bytes": 1_000_000, "out_bytes": 4000},
        {"id": "out", "flops": 1e6, "param_bytes": 0, "out_bytes": 40},
    ],
    "edges": [{"src": "in", "dst": "wide", "bytes": 4000},
              {"src": "in", "dst": "side", "bytes": 4000},
              {"src": "wide", "dst": "out", "bytes": 4000},
              {"src": "side", "dst": "out", "bytes": 4000}],
}
CLUSTER = {
    "format": "edgeswarm.cluster/1",
    "devices": [{"id": "phone", "flops": 2e9, "memory_bytes": 100_000_000},
                {"id": "laptop", "flops": 1e10, "memory_bytes": 1_000_000_000},
                {"id": "pi", "flops": 5e8, "memory_bytes": 2_000_000}],
    "links": [{"src": "phone", "dst": "laptop", "bandwidth_Bps": 1e7, "latency_s": 0.002}],
    "default_link": {"bandwidth_Bps": 1e6, "latency_s": 0.005},
}


@pytest.fixture
def files(tmp_path):
    g, c = tmp_path / "g.json", tmp_path / "c.json"
    g.write_text(json.dumps(GRAPH))
    c.write_text(json.dumps(CLUSTER))
    return tmp_path, str(g), str(c)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The real console entry point, in a subprocess, as a user runs it."""
    code = "from edgeswarm.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("policy", ["heft", "search"])
def test_place_prints_a_table(files, policy):
    _, g, c = files
    result = runner.invoke(app, ["place", "--graph", g, "--cluster", c, "--policy", policy,
                                 "--budget", "6"])
    assert result.exit_code == 0, result.output
    for word in ("in", "wide", "side", "out", "predicted latency", "decision",
                 "simulator calls"):
        assert word in result.stdout


def test_place_json_is_plan_v1_and_simulate_agrees(files):
    tmp, g, c = files
    result = runner.invoke(app, ["place", "--graph", g, "--cluster", c, "--policy", "search",
                                 "--budget", "5", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "edgeswarm.plan/1" and doc["policy"] == "search"
    assert set(doc["assignments"]) == {"in", "wide", "side", "out"}
    assert set(doc["schedule"]) == set(doc["assignments"])
    assert doc["predicted_latency_s"] > 0 and doc["decision_s"] > 0
    assert 0 < doc["simulator_calls"] <= 5
    plan_file = tmp / "plan.json"
    plan_file.write_text(result.stdout)
    sim = runner.invoke(app, ["simulate", "--graph", g, "--cluster", c, "--plan",
                              str(plan_file), "--json"])
    assert sim.exit_code == 0, sim.output
    again = json.loads(sim.stdout)
    assert again["feasible"] is True
    assert again["predicted_latency_s"] == pytest.approx(doc["predicted_latency_s"])
    table = runner.invoke(app, ["simulate", "--graph", g, "--cluster", c, "--plan",
                                str(plan_file)])
    assert table.exit_code == 0 and "feasible: yes" in table.stdout
    assert "memory per device" in table.stdout


def test_no_tp_and_no_codecs_are_respected(files):
    _, g, c = files
    result = runner.invoke(app, ["place", "--graph", g, "--cluster", c, "--policy", "search",
                                 "--budget", "40", "--no-tp", "--no-codecs", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert all(len(devs) == 1 for devs in doc["assignments"].values())
    assert doc["codecs"] == {}


def test_simulate_reports_an_infeasible_plan_with_its_reason(files):
    tmp, g, c = files
    plan = Plan.from_json({"format": "edgeswarm.plan/1",
                           "assignments": {t: ["pi"] for t in ("in", "wide", "side", "out")}})
    path = tmp / "all-on-pi.json"
    path.write_text(plan.dumps())
    result = runner.invoke(app, ["simulate", "--graph", g, "--cluster", c, "--plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "feasible: no" in result.stdout and "'pi'" in result.stdout


def test_plot_writes_a_png(files):
    tmp, g, c = files
    target = tmp / "gantt.png"
    result = runner.invoke(app, ["place", "--graph", g, "--cluster", c, "--plot", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 5000


def _with(tmp, name, doc):
    path = tmp / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_bad_input_is_one_line_naming_the_problem(files):
    tmp, g, c = files
    task = {"flops": 1.0, "param_bytes": 0, "out_bytes": 1}
    cycle = _with(tmp, "cycle.json", {
        "format": "edgeswarm.taskgraph/1",
        "tasks": [{"id": "p", **task}, {"id": "q", **task}],
        "edges": [{"src": "p", "dst": "q", "bytes": 1}, {"src": "q", "dst": "p", "bytes": 1}]})
    unknown = _with(tmp, "unknown.json", {
        "format": "edgeswarm.taskgraph/1", "tasks": [{"id": "p", **task}],
        "edges": [{"src": "p", "dst": "ghost", "bytes": 1}]})
    nowhere = _with(tmp, "nowhere.json", {
        "format": "edgeswarm.taskgraph/1",
        "tasks": [{"id": "p", **task, "devices": ["gpu9"]}], "edges": []})
    huge = _with(tmp, "huge.json", {
        "format": "edgeswarm.taskgraph/1",
        "tasks": [{"id": "giant", **task, "param_bytes": 10**12}], "edges": []})
    unreachable = _with(tmp, "unreachable.json", {
        "format": "edgeswarm.cluster/1",
        "devices": [{"id": "x", "flops": 1e9, "memory_bytes": 10**9},
                    {"id": "y", "flops": 1e9, "memory_bytes": 10**9}], "links": []})
    cases = [
        (["place", "--graph", cycle, "--cluster", c], "cycle through ['p', 'q']"),
        (["place", "--graph", unknown, "--cluster", c], "unknown task 'ghost'"),
        (["place", "--graph", nowhere, "--cluster", c], "task 'p' may run on no device"),
        (["place", "--graph", g, "--cluster", unreachable], "x->y"),
        (["place", "--graph", huge, "--cluster", c, "--policy", "search"], "'giant'"),
        (["place", "--graph", g, "--cluster", str(tmp / "missing.json")], "does not exist"),
        (["place", "--graph", "resnet-9000", "--cluster", c], "neither a file nor a zoo"),
        (["place", "--graph", g, "--cluster", c, "--policy", "magic"], "unknown policy"),
        (["simulate", "--graph", g, "--cluster", c, "--plan", cycle], "plan: format"),
    ]
    for args, message in cases:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_graph_may_be_a_zoo_model(files):
    _, _, c = files
    result = runner.invoke(app, ["place", "--graph", "digits-mlp", "--cluster", c, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert len(doc["assignments"]) >= 3 and doc["predicted_latency_s"] > 0


def test_gantt_transfers_are_the_simulators():
    from edgeswarm.gantt import transfers_of
    from edgeswarm.placement.cluster import Cluster
    from edgeswarm.placement.simulator import simulate
    from edgeswarm.placement.taskgraph import TaskGraph

    g, c = TaskGraph.from_json(GRAPH), Cluster.from_json(CLUSTER)
    plan = Plan.from_json({"format": "edgeswarm.plan/1", "assignments": {
        "in": ["laptop"], "wide": ["laptop", "phone"], "side": ["pi"], "out": ["laptop"]}})
    schedule = simulate(g, c, plan)
    moves = {(t.edge, t.dst): t for t in transfers_of(g, c, plan, schedule)}
    # in->wide reaches phone only (laptop has it); in->side and side->out cross the default link
    assert set(moves) == {(("in", "wide"), "phone"), (("in", "side"), "pi"),
                          (("side", "out"), "laptop")}
    side_out = moves[(("side", "out"), "laptop")]
    assert side_out.start == schedule.slots["side"].end
    assert side_out.end - side_out.start == pytest.approx(0.005 + 4000 / 1e6)
    # the data arrives before the task that needs it starts
    assert side_out.end <= schedule.slots["out"].start + 1e-12
    in_wide = moves[(("in", "wide"), "phone")]
    assert in_wide.end - in_wide.start == pytest.approx(0.002 + 4000 / 1e7)
