import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgeswarm.models.runtimes import compile, load
from edgeswarm.placement.errors import (
    InvalidInput,
    ModelFileError,
    RuntimeNotAvailable,
    UnknownModel,
)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 64, 10)).eval()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.rand(128, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_onnx_fp32_matches_torch_at_any_batch(tmp_path, calib):
    m = _cnn()
    exe = compile(m, "onnx", (calib[:1],), output=tmp_path / "m.onnx")
    assert exe.runtime == "onnx" and exe.path == tmp_path / "m.onnx"
    onnx.checker.check_model(str(exe.path))
    for n in (1, 7, 32):
        got = exe.run([calib[:n]])[0]
        want = m(calib[:n]).detach().numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_torch_runtime_checks_shapes(calib):
    exe = compile(_cnn(), "torch", (calib[:1],))
    assert exe.run([calib[:3]])[0].shape == (3, 10)
    assert exe.size_bytes == sum(p.numel() * 4 for p in _cnn().parameters())
    with pytest.raises(InvalidInput, match=r"expected \(N, 1, 8, 8\)"):
        exe.run([torch.rand(2, 3, 8, 8)])


def test_static_int8_is_quantized_small_and_close(tmp_path, calib):
    m = _cnn()
    fp32 = compile(m, "onnx", (calib[:1],), output=tmp_path / "fp32.onnx")
    int8 = compile(m, "onnx-int8", (calib[:1],), calibration=(calib,),
                   output=tmp_path / "int8.onnx")
    ops = {n.op_type for n in onnx.load(str(int8.path)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert int8.size_bytes <= 0.35 * fp32.size_bytes
    x = calib[:16]
    a, b = fp32.run([x])[0], int8.run([x])[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert load(int8.path).runtime == "onnx-int8" and load(fp32.path).runtime == "onnx"


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 64)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 64)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)


def test_token_inputs_get_dynamic_int8_without_calibration(tmp_path):
    ids = torch.randint(0, 50, (4, 6))
    exe = compile(_TokenModel().eval(), "onnx-int8", (ids[:1],), output=tmp_path / "t.onnx")
    ops = {n.op_type for n in onnx.load(str(exe.path)).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    got = exe.run([ids])[0]
    want = _TokenModel().eval()(ids).detach().numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max() + 1e-3
    with pytest.raises(InvalidInput, match="dtype"):
        exe.run([ids.float()])


def test_artifact_reloads_in_a_fresh_process_with_only_onnxruntime(tmp_path, calib):
    exe = compile(_cnn(), "onnx-int8", (calib[:1],), calibration=(calib,),
                  output=tmp_path / "m.onnx")
    x = calib[:5].numpy()
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys, numpy as np, onnxruntime as ort
        s = ort.InferenceSession({str(exe.path)!r}, providers=["CPUExecutionProvider"])
        y = s.run(None, {{s.get_inputs()[0].name: np.load({str(tmp_path / 'x.npy')!r})}})[0]
        np.save({str(tmp_path / 'y.npy')!r}, y)
        assert "torch" not in sys.modules and "edgeswarm" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), exe.run([x])[0], rtol=0, atol=1e-6)


def test_bad_inputs_give_clear_errors(tmp_path, calib):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        load(bad)
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        compile(bad, "onnx-int8", calibration=(calib,))
    with pytest.raises(ModelFileError, match="does not exist"):
        load(tmp_path / "missing.onnx")
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(ModelFileError, match="unknown artifact type"):
        load(txt)
    with pytest.raises(InvalidInput, match="unknown runtime"):
        compile(_cnn(), "tensorrt", (calib[:1],))
    with pytest.raises(UnknownModel, match="unknown model 'resnet-9000'"):
        compile("resnet-9000", "onnx")
    with pytest.raises(InvalidInput, match="example_inputs"):
        compile(_cnn(), "onnx")
    with pytest.raises(InvalidInput, match="calibration"):
        compile(_cnn(), "onnx-int8", (calib[:1],), output=tmp_path / "x.onnx")
    exe = compile(_cnn(), "onnx", (calib[:1],), output=tmp_path / "ok.onnx")
    with pytest.raises(InvalidInput, match="takes 1 input"):
        exe.run([calib[:1], calib[:1]])


def test_missing_onnxruntime_names_the_extra(tmp_path, calib, monkeypatch):
    path = compile(_cnn(), "onnx", (calib[:1],), output=tmp_path / "m.onnx").path
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeNotAvailable, match=r"edgeswarm\[onnx\]"):
        load(path)
