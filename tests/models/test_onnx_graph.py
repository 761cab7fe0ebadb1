"""ONNX files as task graphs, cut by plans into stage files that compute the whole file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgeswarm.models import zoo
from edgeswarm.models.graph import extract
from edgeswarm.models.onnx_graph import OnnxTraced, trace
from edgeswarm.models.partition import export, partition
from edgeswarm.models.runtimes import load
from edgeswarm.models.runtimes.onnx_export import export_onnx
from edgeswarm.placement.errors import InvalidInput, ModelFileError
from edgeswarm.placement.plan import Plan

F32 = TensorProto.FLOAT


def by_chunks(traced: OnnxTraced, devices: list[str]) -> Plan:
    tasks = [t.id for t in traced.graph.tasks]
    k = len(tasks)
    return Plan({t: (devices[min(len(devices) - 1, len(devices) * i // k)],)
                 for i, t in enumerate(tasks)})


def whole(path: Path, *inputs: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), inputs, strict=True)})


def run_files(files: list, *inputs: np.ndarray) -> list[np.ndarray]:
    """The stage files one after another, each in its own ONNX Runtime session."""
    values = list(inputs)
    for f in files:
        values = load(f.path).run(values)
    return values


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[zoo.ZooModel, Path]:
    """The zoo's digits CNN and its export (torch.export, a free batch dimension)."""
    z = zoo.load("digits-cnn")
    path = tmp_path_factory.mktemp("onnx") / "digits-cnn.onnx"
    export_onnx(z.module, list(z.example_inputs), path, ["x"], ["logits"])
    return z, path


def residual(path: Path) -> Path:
    """x -> MatMul/Relu (a) -> MatMul/Mul by a Constant/Add x (b) -> MatMul (c), returning
    (y, a): the residual x and the early output a must ride along through the stages."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
         for n, s in (("w1", (4, 8)), ("w2", (8, 4)), ("w3", (4, 3)))}
    half = helper.make_tensor("half", F32, [1], [0.5])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["a"], name="relu"),
             helper.make_node("Constant", [], ["c"], name="const", value=half),
             helper.make_node("MatMul", ["a", "w2"], ["h2"], name="mm2"),
             helper.make_node("Mul", ["h2", "c"], ["h3"], name="scale"),
             helper.make_node("Add", ["h3", "x"], ["r"], name="skip"),
             helper.make_node("MatMul", ["r", "w3"], ["y"], name="mm3")]
    graph = helper.make_graph(
        nodes, "residual", [helper.make_tensor_value_info("x", F32, ["batch", 4])],
        [helper.make_tensor_value_info("y", F32, ["batch", 3]),
         helper.make_tensor_value_info("a", F32, ["batch", 8])], initializer=list(w.values()))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_the_task_graph_of_an_export_is_the_torch_models(digits) -> None:
    z, path = digits
    x = z.heldout.batch(0, 32)
    traced = trace(path, x)
    mine, torch_graph = traced.graph, extract(z.module, x)
    assert [t.kind for t in mine.tasks] == [t.kind for t in torch_graph.tasks]
    assert [t.flops for t in mine.tasks] == [t.flops for t in torch_graph.tasks]
    assert [t.out_bytes for t in mine.tasks] == [t.out_bytes for t in torch_graph.tasks]
    assert [e.bytes for e in mine.edges] == [e.bytes for e in torch_graph.edges]
    # the export stores the Reshape's target shape as a weight too (16 bytes)
    assert 0 <= mine.total_param_bytes - torch_graph.total_param_bytes <= 64
    assert mine.tasks[0].id == "input:x" and mine.name == "digits-cnn"


def test_stage_files_compute_what_the_whole_file_does_at_any_batch(digits, tmp_path) -> None:
    z, path = digits
    traced = trace(path, z.heldout.batch(0, 32))
    part = partition(traced.module, traced.example_inputs, by_chunks(traced, ["a", "b", "c"]),
                     traced)
    assert part.devices == ("a", "b", "c")
    for before, after in zip(part.stages, part.stages[1:], strict=False):
        assert before.outputs == after.inputs     # each stage feeds the next
    files = export(part, traced.example_inputs, tmp_path, "onnx")
    for batch in (1, 7, 32):
        x = z.heldout.batch(0, batch)[0].numpy()
        want = whole(path, x)
        got = run_files(files, x)
        assert len(got) == 1 and np.array_equal(got[0], want[0])
        assert np.array_equal(part.run(torch.from_numpy(x)).numpy(), want[0])
    with torch.inference_mode():
        np.testing.assert_allclose(traced.module(*traced.example_inputs).numpy(),
                                   z.module(*traced.example_inputs).numpy(), atol=1e-5)


def test_a_residual_and_an_early_output_ride_along(tmp_path) -> None:
    path = residual(tmp_path / "residual.onnx")
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    traced = trace(path, [x])
    assert [t.id for t in traced.graph.tasks] == ["input:x", "mm1", "mm2", "mm3"]
    plan = Plan({"input:x": ("a",), "mm1": ("a",), "mm2": ("b",), "mm3": ("c",)})
    part = partition(traced.module, traced.example_inputs, plan, traced)
    assert [(s.inputs, s.outputs) for s in part.stages] == [
        (("x",), ("x", "a")), (("x", "a"), ("a", "r")), (("a", "r"), ("y", "a"))]
    # the Constant computes from weights only: in the stage that reads it, in no task
    kinds = [[n.op_type for n in onnx.load_from_string(s.onnx_model).graph.node]
             for s in part.stages]
    assert kinds == [["MatMul", "Relu"], ["Constant", "MatMul", "Mul", "Add"], ["MatMul"]]
    files = export(part, traced.example_inputs, tmp_path / "stages", "onnx")
    got, want = run_files(files, x), whole(path, x)
    assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    y, a = part.run(torch.from_numpy(x))          # the model's (y, a), as the file returns
    assert np.array_equal(y.numpy(), want[0]) and np.array_equal(a.numpy(), want[1])


class Encoder(nn.Module):
    """Token ids and a mask in, (logits, hidden states) out: an embedding, shape arithmetic
    on the inputs' free dimensions, attention and LayerNormalization."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(32, 2, 64, batch_first=True,
                                                               dropout=0.0) for _ in range(2))
        self.head = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.emb(ids) * mask.unsqueeze(-1).float()
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(1)), h


def test_a_transformer_cut_in_five_runs_at_other_lengths(tmp_path) -> None:
    torch.manual_seed(0)
    ids, mask = torch.randint(0, 100, (4, 7)), torch.ones(4, 7, dtype=torch.int64)
    path = export_onnx(Encoder().eval(), [ids, mask], tmp_path / "enc.onnx", ["ids", "mask"],
                       ["logits", "hidden"], free_dims={"ids": [1], "mask": [1]})
    traced = trace(path, [ids, mask])
    kinds = [t.kind for t in traced.graph.tasks]
    assert kinds.count("norm") == 4 and kinds.count("embedding") == 1
    part = partition(traced.module, (), by_chunks(traced, ["a", "b", "c", "d", "e"]), traced)
    assert len(part.stages) == 5
    files = export(part, traced.example_inputs, tmp_path / "stages", "onnx")
    x = [np.random.default_rng(2).integers(0, 100, (3, 11)), np.ones((3, 11), np.int64)]
    got, want = run_files(files, *x), whole(path, *x)
    assert [g.shape for g in got] == [(3, 5), (3, 11, 32)]
    for g, w in zip(got, want, strict=True):     # ONNX Runtime fuses across some cuts
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_costs_come_from_the_inferred_shapes(tmp_path) -> None:
    n = 5
    traced = trace(residual(tmp_path / "residual.onnx"),
                   [np.zeros((n, 4), np.float32)])
    g = traced.graph
    assert g.task("mm1").flops == 2 * n * 4 * 8 + n * 8            # MatMul + Relu
    assert g.task("mm2").flops == 2 * n * 8 * 4 + n * 4 + n * 4    # MatMul + Mul + Add
    assert g.task("mm3").flops == 2 * n * 4 * 3
    assert g.task("mm2").param_bytes == 8 * 4 * 4 + 4               # w2 and the Constant
    edges = {(e.src, e.dst): e.bytes for e in g.edges}
    assert edges == {("input:x", "mm1"): n * 4 * 4, ("input:x", "mm2"): n * 4 * 4,
                     ("mm1", "mm2"): n * 8 * 4, ("mm2", "mm3"): n * 4 * 4}
    assert g.task("mm1").out_bytes == n * 8 * 4      # a leaves it (to mm2 and the caller)
    assert g.task("mm1").kind == "linear" and g.task("mm1").splittable


def test_shapes_inference_leaves_open_are_measured(tmp_path) -> None:
    # NonZero's output size depends on the data: one ONNX Runtime run tells it
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("NonZero", ["r"], ["nz"], name="nonzero")],
        "nonzero", [helper.make_tensor_value_info("x", F32, [2, 3])],
        [helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "nnz"])])
    path = tmp_path / "nz.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    x = np.array([[1, -1, 2], [0, 3, -4]], np.float32)
    traced = trace(path, [x])
    assert traced.graph.task("relu").out_bytes == 2 * 3 * 8   # 2 dims x 3 non-zeros, int64


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all\n" * 10, b"\x08\xff" * 64],
                         ids=["empty", "text", "garbage"])
def test_a_corrupt_file_is_a_model_file_error(tmp_path, content) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"bad\.onnx is not a valid ONNX model"):
        trace(path)


def test_a_truncated_export_and_a_missing_file_are_named(digits, tmp_path) -> None:
    _, path = digits
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelFileError, match=r"cut\.onnx is not a valid ONNX model"):
        trace(cut)
    with pytest.raises(ModelFileError, match="does not exist"):
        trace(tmp_path / "nowhere.onnx")


def test_unsupported_files_say_why(tmp_path) -> None:
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", F32, [2])])
    flow = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)], "if",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", F32, [2])],
        [helper.make_tensor_value_info("y", F32, [2])])
    onnx.save(helper.make_model(flow, opset_imports=[helper.make_opsetid("", 18)]),
              tmp_path / "if.onnx")
    with pytest.raises(ModelFileError, match="control flow \\(If\\)"):
        trace(tmp_path / "if.onnx")
    custom = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "custom",
        [helper.make_tensor_value_info("x", F32, [2])],
        [helper.make_tensor_value_info("y", F32, [2])])
    onnx.save(helper.make_model(custom, opset_imports=[helper.make_opsetid("", 18),
                                                       helper.make_opsetid("com.example", 1)]),
              tmp_path / "custom.onnx")
    with pytest.raises(ModelFileError, match="ONNX Runtime cannot run"):
        trace(tmp_path / "custom.onnx")


def test_bad_examples_and_plans_are_named(tmp_path) -> None:
    path = residual(tmp_path / "residual.onnx")
    with pytest.raises(InvalidInput, match="takes 1 input"):
        trace(path, [np.zeros((2, 4), np.float32)] * 2)
    with pytest.raises(InvalidInput, match=r"'x'.*int64.*expected float32"):
        trace(path, [np.zeros((2, 4), np.int64)])
    with pytest.raises(InvalidInput, match=r"\(2, 5\), expected float32 \(N, 4\)"):
        trace(path, [np.zeros((2, 5), np.float32)])
    traced = trace(path)
    assert traced.example_inputs[0].shape == (1, 4)       # free dimensions made 1
    with pytest.raises(InvalidInput, match="does not place task 'mm3'"):
        partition(traced.module, (), Plan({"input:x": ("a",), "mm1": ("a",),
                                           "mm2": ("a",)}), traced)
    with pytest.raises(InvalidInput, match="tensor-parallel"):
        partition(traced.module, (), Plan({"input:x": ("a",), "mm1": ("a", "b"),
                                           "mm2": ("a",), "mm3": ("a",)}), traced)
    part = partition(traced.module, (), by_chunks(traced, ["a"]), traced)
    with pytest.raises(InvalidInput, match=r"tflite-int8.*use onnx, onnx-int8"):
        export(part, traced.example_inputs, tmp_path / "out", "tflite-int8")
