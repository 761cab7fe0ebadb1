"""`edgeswarm export`: shards plus a signed manifest that verifies and chains to the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeswarm.cli import app
from edgeswarm.device_agent import keys
from edgeswarm.device_agent.manifest import read_signed
from edgeswarm.device_agent.protocol import Rejected
from edgeswarm.models import zoo
from edgeswarm.models.graph import extract
from edgeswarm.models.runtimes import load
from edgeswarm.placement.errors import InvalidInput
from edgeswarm.placement.plan import Plan

runner = CliRunner()


def test_export_writes_stages_and_a_signed_manifest(tmp_path: Path) -> None:
    key = keys.generate()
    key_file = keys.write(tmp_path / "k.key", key)
    z = zoo.load("digits-mlp")
    tasks = [t.id for t in extract(z.module, z.example_inputs).tasks]
    plan = Plan({t: ("a" if i < len(tasks) // 2 else "b",) for i, t in enumerate(tasks)})
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(plan.to_json()))
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "digits-mlp", "--plan", str(plan_file), "-o",
                                 str(out), "--key-file", str(key_file)])
    assert result.exit_code == 0, result.output
    manifest = read_signed(out / "manifest.json", key)
    assert [s.device for s in manifest.shards] == ["a", "b"]
    assert manifest.ranks == {"coordinator": 0, "a": 1, "b": 2}
    assert manifest.shards[0].recv_from == [0] and manifest.shards[1].send_to == [0]
    x = z.heldout.inputs[0][:4]
    values = [x.numpy()]
    for shard in manifest.shards:
        values = load(Path(shard.artifact.url.removeprefix("file://"))).run(values)
    with torch.inference_mode():
        np.testing.assert_allclose(values[0], z.module(x).numpy(), atol=1e-5)
    with pytest.raises(Rejected):  # the manifest is bound to the cluster key
        read_signed(out / "manifest.json", keys.generate())
    bad = runner.invoke(app, ["export", "digits-mlp", "--plan", str(tmp_path / "nope.json"),
                              "-o", str(out), "--key-file", str(key_file)])
    assert isinstance(bad.exception, InvalidInput) and "cannot read plan" in str(bad.exception)
