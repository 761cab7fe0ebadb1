"""What the nodes of an ONNX graph cost: tensor shapes, bytes and FLOPs.

Pure functions of the graph (no ONNX Runtime): :func:`inferred_shapes` runs ONNX shape
inference with the inputs' dimensions fixed; :func:`node_flops` counts a node's FLOPs as
the torch extraction (:mod:`edgeswarm.models.graph`, ``torch.utils.flop_counter``) counts
the same layer, so that a model and its export cost the same to the planner:
``2*M*K*N`` for MatMul and Gemm (a bias is not counted), ``2 * output elements *
C_in/groups * kernel`` for Conv, and for every other node one FLOP per output element
(:data:`PER_ELEMENT` for the exceptions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx

Shape = tuple[int, tuple[int, ...]]   # (onnx element type, dimensions)

#: FLOPs per output element of a node that is not counted by its operator, by task kind.
PER_ELEMENT = {"norm": 5.0, "reshape": 0.0}


def inferred_shapes(model: onnx.ModelProto, inputs: Mapping[str, tuple[int, ...]]
                    ) -> dict[str, Shape]:
    """The element type and dimensions of every tensor that ONNX shape inference can tell
    with the model's inputs fixed to ``inputs`` (the initializers' included); tensors
    whose size depends on the data are left out."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for info in fixed.graph.input:
        if info.name in inputs:
            dims = info.type.tensor_type.shape.dim
            for d, size in zip(dims, inputs[info.name], strict=True):
                d.Clear()
                d.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # best effort: the caller measures what is left open
        inferred = fixed
    g = inferred.graph
    out: dict[str, Shape] = {}
    for info in (*g.input, *g.value_info, *g.output):
        shape = _static(info)
        if shape is not None:
            out[info.name] = shape
    for t in g.initializer:
        out[t.name] = (t.data_type, tuple(int(d) for d in t.dims))
    return out


def _static(info: Any) -> Shape | None:
    t = info.type.tensor_type
    if not info.type.HasField("tensor_type") or not t.HasField("shape") or not t.elem_type:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
    return None if any(d < 0 for d in dims) else (t.elem_type, tuple(dims))


def nbytes(shape: Shape) -> int:
    """Bytes of a tensor of this element type and these dimensions."""
    from onnx.helper import tensor_dtype_to_np_dtype

    elem, dims = shape
    return int(np.prod(dims, dtype=np.int64)) * tensor_dtype_to_np_dtype(elem).itemsize


def node_flops(node: onnx.NodeProto, kind: str, shapes: Mapping[str, Shape]) -> float:
    """FLOPs of one node for these tensor shapes; ``kind``: its task kind (see the module
    doc)."""
    def dims(k: int) -> tuple[int, ...]:
        return shapes[node.input[k]][1] if k < len(node.input) and node.input[k] in shapes \
            else ()

    out = shapes.get(node.output[0]) if node.output else None
    out_numel = float(np.prod(out[1], dtype=np.float64)) if out else 0.0
    op = node.op_type
    if op in ("MatMul", "MatMulInteger", "FusedMatMul", "QLinearMatMul"):
        a = dims(0)
        return 2.0 * out_numel * (a[-1] if a else 1)
    if op == "Gemm":
        a = dims(0)
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = (a[0] if trans_a else a[-1]) if a else 1
        return 2.0 * out_numel * k
    if op in ("Conv", "ConvInteger", "QLinearConv", "FusedConv"):
        w = dims(3 if op == "QLinearConv" else 1)
        return 2.0 * out_numel * float(np.prod(w[1:], dtype=np.float64)) if w else out_numel
    if op == "ConvTranspose":
        x, w = dims(0), dims(1)
        return 2.0 * float(np.prod(x, dtype=np.float64)) * float(np.prod(w[1:], dtype=np.float64))
    if op == "Einsum":
        return _einsum_flops(node, shapes, out_numel)
    return PER_ELEMENT.get(kind, 1.0) * out_numel


def _einsum_flops(node: onnx.NodeProto, shapes: Mapping[str, Shape], out_numel: float) -> float:
    """2 x the product of every index's size (the loop nest einsum runs); ellipses: one per
    output element."""
    eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    terms = eq.replace(" ", "").split("->")[0].split(",")
    if "." in eq or len(terms) != len(node.input):
        return out_numel
    size: dict[str, int] = {}
    for term, name in zip(terms, node.input, strict=True):
        for letter, d in zip(term, shapes.get(name, (0, ()))[1], strict=False):
            size[letter] = d
    return 2.0 * float(np.prod(list(size.values()), dtype=np.float64))
