"""Single-device use: load a zoo model, look at its task graph, run it in int8.

    .venv/bin/python examples/single_device.py [MODEL]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import edgeswarm as es
from edgeswarm.models import zoo
from edgeswarm.models.graph import extract


def main(name: str = "digits-cnn") -> None:
    model = zoo.load(name)
    graph = extract(model.module, model.example_inputs, name=name)
    print(f"{name}: {len(graph.tasks)} tasks, {graph.total_flops / 1e6:.2f} MFLOPs/sample")
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in ("onnx", "onnx-int8"):
            exe = es.compile(name, runtime=runtime, output=Path(tmp) / f"{name}.{runtime}.onnx")
            inputs = [x.numpy() for x in model.heldout.inputs]
            t0 = time.perf_counter()
            out = exe.run(inputs)[0]
            seconds = time.perf_counter() - t0
            line = f"{runtime:10s} {exe.size_bytes / 1e3:8.1f} KB {seconds * 1e3:8.1f} ms"
            if model.heldout.labels is not None:
                acc = float(np.mean(out.argmax(-1) == model.heldout.labels.numpy()))
                line += f"  held-out accuracy {acc:.4f}"
            print(line)


if __name__ == "__main__":
    main(*sys.argv[1:])
