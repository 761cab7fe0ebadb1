"""The weight-only int8 scheme: int8 weight blocks (MatMulNBits) and int8 embedding rows.

Small models check the graph rewrites (tied output projections read the embedding's int8
blocks, untied tables get int8 rows); smollm2 checks the figures on real text.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeswarm.models import zoo
from edgeswarm.models.runtimes import compile, load
from edgeswarm.models.runtimes.onnx_quant import quantize_onnx
from edgeswarm.placement.errors import InvalidInput


class _TiedLM(nn.Module):
    """Embedding, one hidden layer, and an output projection tied to the embedding."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(300, hidden)
        self.fc = nn.Linear(hidden, hidden)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.relu(self.fc(self.emb(ids))), self.emb.weight)


class _UntiedLM(_TiedLM):
    def __init__(self, hidden: int) -> None:
        super().__init__(hidden)
        self.head = nn.Linear(hidden, 300)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(ids))))


def _ids(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 300, (n, 7), generator=torch.Generator().manual_seed(2))


def _initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def _close(got: np.ndarray, want: np.ndarray) -> bool:
    return bool(np.abs(got - want).max() < 0.05 * np.abs(want).max())


# 64: the width is one block; 72: two blocks, the second padded, so lookups are cut back.
@pytest.mark.parametrize("hidden", [64, 72])
def test_tied_projection_stores_the_embedding_once_in_int8(tmp_path, hidden):
    model = _TiedLM(hidden).eval()
    ids = _ids()
    fp32 = compile(model, "onnx", (ids[:1],), output=tmp_path / "fp32.onnx")
    exe = compile(model, "onnx-int8", (ids[:1],), output=tmp_path / "int8.onnx",
                  int8_scheme="weight-only")
    graph = onnx.load(str(exe.path)).graph
    assert "MatMulNBits" in {n.op_type for n in graph.node}
    tables = [i for i in graph.initializer if 300 in i.dims]
    # the output projection's uint8 blocks and their scales, nothing in float32 besides
    assert [i.data_type for i in tables if i.data_type != onnx.TensorProto.FLOAT] == [
        onnx.TensorProto.UINT8]
    assert sum(int(np.prod(i.dims)) for i in tables if i.data_type == onnx.TensorProto.FLOAT) \
        < 300 * hidden / 16
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    assert any(i.name in gathered for i in tables if i.data_type == onnx.TensorProto.UINT8)
    padded = -(-hidden // 64) * 64  # MatMulNBits pads each row to whole blocks
    assert exe.size_bytes < 0.35 * padded / hidden * fp32.size_bytes
    want = model(ids).detach().numpy()
    assert _close(exe.run([ids])[0], want)
    assert load(exe.path).runtime == "onnx-int8"


def test_untied_embedding_gets_int8_rows(tmp_path):
    model = _UntiedLM(64).eval()
    ids = _ids()
    exe = compile(model, "onnx-int8", (ids[:1],), output=tmp_path / "int8.onnx",
                  int8_scheme="weight-only")
    inits = _initializers(exe.path)
    rows = [i for i in inits.values() if list(i.dims) == [300, 64]]
    assert [i.data_type for i in rows] == [onnx.TensorProto.INT8]
    assert list(inits[rows[0].name.removesuffix("_int8") + "_row_scale"].dims) == [300, 1]
    assert _close(exe.run([ids])[0], model(ids).detach().numpy())
    assert load(exe.path).runtime == "onnx-int8"


def test_weight_only_prints_nothing_and_leaves_logging_alone(tmp_path):
    """ORT's quantizer calls logging.basicConfig(INFO) on import and logs every node."""
    script = textwrap.dedent(f"""
        import logging, torch
        from edgeswarm.models.runtimes import compile
        model = torch.nn.Sequential(torch.nn.Embedding(300, 64), torch.nn.Linear(64, 8))
        compile(model.eval(), "onnx-int8", (torch.zeros(1, 5, dtype=torch.int64),),
                output={str(tmp_path / 'm.onnx')!r}, int8_scheme="weight-only")
        root = logging.getLogger()
        assert root.handlers == [] and root.level == logging.WARNING, (root.handlers, root.level)
        name = "onnxruntime.quantization.matmul_nbits_quantizer"
        assert name in logging.Logger.manager.loggerDict
        assert logging.getLogger(name).level == logging.NOTSET
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_unknown_scheme_names_the_valid_ones(tmp_path):
    ids = _ids()
    with pytest.raises(InvalidInput, match="auto, static, dynamic, weight-only"):
        compile(_TiedLM(64).eval(), "onnx-int8", (ids[:1],), output=tmp_path / "x.onnx",
                int8_scheme="int4")
    assert not list(tmp_path.iterdir())  # refused before exporting anything
    with pytest.raises(InvalidInput, match="static, dynamic, weight-only"):
        quantize_onnx(tmp_path / "in.onnx", tmp_path / "out.onnx", "int4")


@pytest.fixture(scope="module")
def smollm2_int8(tmp_path_factory) -> tuple[zoo.ZooModel, Path]:
    exe = compile("smollm2", "onnx-int8",
                  output=tmp_path_factory.mktemp("smollm2") / "smollm2.int8.onnx")
    assert exe.runtime == "onnx-int8"
    return zoo.load("smollm2"), exe.path


@pytest.mark.slow
def test_smollm2_int8_agrees_with_fp32_at_a_quarter_of_the_size(smollm2_int8):
    model, path = smollm2_int8
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops  # the zoo asks for weight-only; auto honours it
    ids = model.heldout.inputs[0]
    with torch.inference_mode():
        want = model.module(ids).numpy()
    got = load(path).run([ids])[0]
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    fp32_bytes = sum(p.numel() * 4 for p in model.module.parameters())
    assert path.stat().st_size <= 0.3 * fp32_bytes


@pytest.mark.slow
def test_smollm2_int8_reloads_in_a_fresh_process(smollm2_int8, tmp_path):
    model, path = smollm2_int8
    ids = model.heldout.inputs[0][:2].numpy()
    np.save(tmp_path / "ids.npy", ids)
    script = textwrap.dedent(f"""
        import json, numpy as np
        from edgeswarm.models.runtimes import load
        exe = load({str(path)!r})
        np.save({str(tmp_path / 'out.npy')!r}, exe.run([np.load({str(tmp_path / 'ids.npy')!r})])[0])
        print(json.dumps({{"runtime": exe.runtime}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert json.loads(done.stdout) == {"runtime": "onnx-int8"}
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), load(path).run([ids])[0],
                               rtol=0, atol=1e-5)
