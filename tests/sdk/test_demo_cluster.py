"""`edgeswarm demo`: the testbed tour runs end to end and checks its own results."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from edgeswarm.demo_cluster import run_cluster_demo


@pytest.mark.slow
def test_the_cluster_demo_deploys_runs_and_draws(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    gantt = tmp_path / "gantt.png"
    run_cluster_demo(Console(file=out, width=120), Console(file=err), gantt=gantt,
                     requests=3)
    text = out.getvalue()
    assert "wrong results: 0" in text
    assert "predicted" in text and "measured median" in text
    for device in ("laptop-1", "jetson-1", "phone-1", "pi-1"):
        assert device in text
    assert gantt.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
