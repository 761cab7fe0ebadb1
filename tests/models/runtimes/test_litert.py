"""tflite-int8: full-integer LiteRT models converted from torch, run by the LiteRT interpreter.

The models are trained for a few steps on sklearn's digits (real 8x8 images) so that the
accuracy comparison means something. The MLP converts with a dynamic batch dimension; the
CNN (flatten, a MaxPool2d module called twice) falls back to a static batch of 1.
"""

import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest

from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

torch = pytest.importorskip("torch")
pytest.importorskip("ai_edge_litert", reason="the LiteRT interpreter is not installed: "
                    "pip install 'edgeswarm[litert]'")
from ai_edge_litert.interpreter import Interpreter  # noqa: E402
from torch import nn  # noqa: E402

from edgeswarm.models.runtimes.litert import LiteRTExecutable, convert_int8  # noqa: E402

NEEDS_CONVERTER = "litert-torch is not installed: pip install 'edgeswarm[tflite-convert]'"


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        self.fc3 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2)  # called twice on purpose
        self.fc1 = nn.Linear(64 * 2 * 2, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


SHAPES = {"mlp": (64,), "cnn": (1, 8, 8)}
MODELS = {"mlp": _MLP, "cnn": _CNN}


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, y, order[:1400], order[1400:]


def _train(name: str, digits) -> nn.Module:
    x, y, train, _ = digits
    x = x.view(-1, *SHAPES[name])
    gen = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MODELS[name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        idx = train[torch.randint(0, len(train), (128,), generator=gen)]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def case(request, digits, tmp_path_factory):
    pytest.importorskip("litert_torch", reason=NEEDS_CONVERTER)
    name = request.param
    model = _train(name, digits)
    x, y, train, heldout = digits
    x = x.view(-1, *SHAPES[name])
    path = convert_int8(model, (x[:1],), (x[train[:512]],),
                        tmp_path_factory.mktemp(name) / f"{name}.tflite")
    return name, model, path, x[heldout], y[heldout]


def test_weights_and_activations_are_int8(case):
    _, _, path, _, _ = case
    interpreter = Interpreter(model_path=str(path))
    dtypes = Counter(np.dtype(d["dtype"]).name for d in interpreter.get_tensor_details())
    # int8 weights and activations, int32 biases; nothing left in float
    assert dtypes["float32"] == 0, dtypes
    assert dtypes["int8"] >= 2 * dtypes["int32"], dtypes
    boundary = interpreter.get_input_details() + interpreter.get_output_details()
    assert all(d["dtype"] == np.int8 and d["quantization"][0] > 0 for d in boundary)


def test_file_is_under_035x_the_fp32_parameters(case):
    _, model, path, _, _ = case
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert path.stat().st_size <= 0.35 * fp32_bytes


def test_accuracy_within_two_points_of_fp32(case):
    _, model, path, x, y = case
    with torch.no_grad():
        fp32 = (model(x).argmax(1) == y).float().mean().item()
    exe = LiteRTExecutable(path)
    int8 = float((exe.run([x])[0].argmax(1) == y.numpy()).mean())
    assert fp32 > 0.9
    assert abs(int8 - fp32) <= 0.02, (fp32, int8)


def test_batch_1_and_32_agree(case):
    name, _, path, x, _ = case
    exe = LiteRTExecutable(path, threads=1)
    assert exe.runtime == "tflite-int8"
    assert exe.input_names == ("input",) and exe.output_names == ("output",)
    assert exe.batch_sizes == (() if name == "mlp" else (1, 32))
    rows = np.concatenate([exe.run([x[i:i + 1]])[0] for i in range(40)])
    batch = exe.run([x[:32]])[0]
    assert batch.shape == (32, 10) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch, rows[:32])
    for n in (3, 7, 40):  # row by row; one padded call; a full call and a padded one
        np.testing.assert_array_equal(exe.run([x[:n].numpy()])[0], rows[:n])


def test_reloads_in_a_process_without_torch(case, tmp_path):
    _, _, path, x, _ = case
    np.save(tmp_path / "x.npy", x[:32].numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # the device side must not need torch
        import numpy as np
        from edgeswarm.models.runtimes.litert import LiteRTExecutable
        exe = LiteRTExecutable({str(path)!r})
        np.save({str(tmp_path / "y.npy")!r}, exe.run([np.load({str(tmp_path / "x.npy")!r})])[0])
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    want = LiteRTExecutable(path).run([x[:32]])[0]
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)


def test_wrong_inputs_are_named(case):
    name, _, path, x, _ = case
    exe = LiteRTExecutable(path)
    wrong = np.zeros((4, 65), np.float32) if name == "mlp" else np.zeros((4, 1, 8, 9), np.float32)
    with pytest.raises(InvalidInput, match=r"'input' has shape .*expected \(N, "):
        exe.run([wrong])
    with pytest.raises(InvalidInput, match=r"expected float32"):
        exe.run([x[:2].numpy().astype(np.int64)])
    with pytest.raises(InvalidInput, match=r"takes 1 input"):
        exe.run([x[:2], x[:2]])


@pytest.mark.parametrize("content", [b"", b"not a flatbuffer\n" * 8, b"\x08\x07\x12\x07pytorch"],
                         ids=["empty", "text", "onnx-header"])
def test_corrupt_file_is_a_model_file_error(tmp_path, content):
    path = tmp_path / "bad.tflite"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"bad\.tflite is not a valid LiteRT model"):
        LiteRTExecutable(path)


def test_truncated_model_is_a_model_file_error(case, tmp_path):
    _, _, path, _, _ = case
    bad = tmp_path / "half.tflite"
    data = path.read_bytes()
    bad.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelFileError, match=r"half\.tflite"):
        LiteRTExecutable(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        LiteRTExecutable(tmp_path / "nope.tflite")


def test_missing_packages_say_what_to_install(monkeypatch, tmp_path):
    # the one place a fake is needed: both packages are installed here
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    with pytest.raises(RuntimeNotAvailable, match=r"edgeswarm\[tflite-convert\].*1 GB"):
        convert_int8(_MLP(), (torch.zeros(1, 64),), (torch.zeros(8, 64),), tmp_path / "m.tflite")
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    with pytest.raises(RuntimeNotAvailable, match=r"edgeswarm\[litert\]"):
        LiteRTExecutable(tmp_path / "m.tflite")


def test_calibration_must_match_the_inputs(tmp_path):
    pytest.importorskip("litert_torch", reason=NEEDS_CONVERTER)
    with pytest.raises(InvalidInput, match="calibration has 2 tensor"):
        convert_int8(_MLP(), (torch.zeros(1, 64),), (torch.zeros(8, 64), torch.zeros(8, 64)),
                     tmp_path / "m.tflite")
    with pytest.raises(InvalidInput, match="must match except for the batch size"):
        convert_int8(_MLP(), (torch.zeros(1, 64),), (torch.zeros(8, 63),), tmp_path / "m.tflite")


class _TinyEncoder(nn.Module):
    """Embedding + LayerNorm + softmax attention + mean pooling, on int64 token ids."""

    def __init__(self, vocab: int = 100, dim: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(16, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 4 * dim)
        self.ff2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, input_ids, attention_mask):
        b, t = input_ids.shape
        x = self.ln1(self.tok(input_ids) + self.pos(torch.arange(t))[None])
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2)
                   for z in self.qkv(x).chunk(3, dim=-1))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = self.ln2(x + self.out(y))
        x = x + self.ff2(torch.relu(self.ff1(x)))
        mask = attention_mask[..., None].float()
        return self.head((x * mask).sum(1) / mask.sum(1))


@pytest.mark.slow
def test_token_inputs_convert_with_int8_linears_only(tmp_path):
    """int64 token ids work (they become int32); only the linear layers run in int8."""
    pytest.importorskip("litert_torch", reason=NEEDS_CONVERTER)
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = _TinyEncoder().eval()
    ids = torch.randint(0, 100, (256, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[:, 12:] = 0
    path = convert_int8(model, (ids[:1], mask[:1]), (ids, mask), tmp_path / "enc.tflite",
                        input_names=("input_ids", "attention_mask"), output_names=("logits",))
    exe = LiteRTExecutable(path)
    assert exe.input_names == ("input_ids", "attention_mask")
    assert exe.output_names == ("logits",)
    assert exe.batch_sizes == (1, 32)  # attention reshapes cannot be lowered with a dynamic batch
    interpreter = Interpreter(model_path=str(path))
    assert [d["dtype"] for d in interpreter.get_input_details()] == [np.int32, np.int32]
    ops = Counter(op["op_name"] for op in interpreter._get_ops_details())
    assert ops["FULLY_CONNECTED"] == 5 and ops["DEQUANTIZE"] > 0  # float islands remain
    with torch.no_grad():
        want = model(ids[:32], mask[:32]).numpy()
    got = exe.run([ids[:32], mask[:32]])[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    with pytest.raises(InvalidInput, match=r"expected \(N, 16\)"):
        exe.run([ids[:2, :8], mask[:2, :8]])

