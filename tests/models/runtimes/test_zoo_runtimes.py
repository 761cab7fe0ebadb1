"""Zoo models through every runtime: real held-out data, artifacts that reload."""

import numpy as np
import pytest

from edgeswarm.models import zoo
from edgeswarm.models.runtimes import compile, load


def _accuracy(exe, model) -> float:
    out = exe.run([x.numpy() for x in model.heldout.inputs])[0]
    return float((out.argmax(-1) == model.heldout.labels.numpy()).mean())


@pytest.mark.parametrize("runtime", ["torch", "onnx", "onnx-int8", "tflite-int8"])
def test_digits_cnn_keeps_its_accuracy_on_every_runtime(runtime, tmp_path):
    if runtime == "tflite-int8":
        pytest.importorskip("litert_torch", reason="tflite-convert extra not installed")
    model = zoo.load("digits-cnn")
    exe = compile("digits-cnn", runtime, output=tmp_path / f"cnn-{runtime}")
    assert exe.runtime == runtime
    fp32 = model.reported["heldout_accuracy"]
    assert _accuracy(exe, model) >= fp32 - 0.02
    if exe.path is not None:
        again = load(exe.path)
        x = [model.heldout.inputs[0][:33].numpy()]
        np.testing.assert_array_equal(again.run(x)[0], exe.run(x)[0])


def test_minilm_int8_stays_close_to_fp32(tmp_path):
    model = zoo.load("minilm")
    exe = compile("minilm", "onnx-int8", output=tmp_path / "minilm.int8.onnx")
    batch = model.batch(16)
    got = exe.run([x.numpy() for x in batch])[0]
    want = model.module(*batch).detach().numpy()
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 0.97 and cos.mean() > 0.985
    assert exe.size_bytes < 0.3 * sum(p.numel() * 4 for p in model.module.parameters())
