"""int8 quantization of ONNX files with ONNX Runtime's quantization tooling.

Three schemes:

- ``static``: QDQ format, int8 weights (per channel) and uint8 activations whose ranges
  are calibrated on real data. The right choice for CNNs and MLPs: ONNX Runtime's
  dynamic int8 convolution is far slower than fp32 here.
- ``dynamic``: int8 weights (per channel), activation ranges computed per batch at run
  time (MatMulInteger). No calibration. The choice for token-input encoders: on
  minilm, static QDQ ran at the same speed (272 vs 259 sentences/s at batch 32) but its
  quantized softmax and mask additions dropped the mean cosine to fp32 to 0.37, while
  dynamic keeps 0.993.
- ``weight-only``: every MatMul weight in int8 blocks of 64 along its input dimension,
  one fp32 scale per block (``MatMulNBits``, symmetric); the kernel quantizes each
  activation block to int8 on the fly (``accuracy_level`` 4), which is where its speed
  comes from. Embedding tables become int8 rows with one scale per row, or read the
  int8 blocks of a tied output projection so the table is stored once. No calibration.
  The choice for decoder LMs: on smollm2 at batch 32, dynamic kept 0.51 top-1 agreement
  with fp32; weight-only keeps 0.93 at 0.27x the fp32 file and 1.1-1.6x its speed.
  Blocks of 128 run up to 10% faster but drift further from fp32 (KL 0.016 against
  0.009, 0.93 agreement) in a bigger file (0.28x: smollm2's 576-wide inputs pad to 640);
  blocks of 32 drift less (KL 0.006, 0.96 agreement, 0.28x) but run 10% slower; fp32
  activations (``accuracy_level`` 1) agree at 0.98 but run no faster than fp32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgeswarm.placement.errors import InvalidInput, ModelFileError, RuntimeNotAvailable

if TYPE_CHECKING:
    import onnx

log = logging.getLogger("edgeswarm.models.runtimes")

Scheme = Literal["static", "dynamic", "weight-only"]
SCHEMES: tuple[Scheme, ...] = ("static", "dynamic", "weight-only")

CALIBRATION_BATCH = 32
#: Weights in 7 bits: x86 CPUs without VNNI (AVX2/SSE: most edge boxes, this AMD EPYC)
#: multiply u8 x s8 with VPMADDUBSW, whose 16-bit pair sums saturate on full-range weights
#: (ONNX Runtime's quantization docs). The artifact runs on CPUs the exporter cannot see,
#: so it is always built for both; on VNNI CPUs it costs one bit of weight precision.
REDUCE_RANGE = True
#: Weights per fp32 scale in the weight-only scheme (along a MatMul's input dimension).
WEIGHT_ONLY_BLOCK = 64
_NBITS_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"
#: MatMulNBits stores symmetric 8-bit weights as uint8 with this implicit zero point.
_NBITS_ZERO_POINT = 128


def quantize_onnx(fp32_path: Path, out_path: Path, scheme: Scheme,
                  calibration: Sequence[np.ndarray] | None = None,
                  input_names: Sequence[str] | None = None) -> Path:
    """Write an int8 version of ``fp32_path`` to ``out_path``."""
    if scheme not in SCHEMES:
        raise InvalidInput(f"unknown int8 scheme {scheme!r}: use one of {', '.join(SCHEMES)}")
    try:
        from onnxruntime import quantization as q
    except ImportError:
        raise RuntimeNotAvailable(
            "int8 quantization needs ONNX Runtime: pip install 'edgeswarm[models]'") from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if scheme == "weight-only":
        # No pre-processing: its constant folding would hide which output projection
        # is the transpose of an embedding table, and MatMulNBits needs no shape info.
        _quantize_weight_only(fp32_path, out_path, WEIGHT_ONLY_BLOCK)
        return _check_written(fp32_path, out_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            # symbolic shape inference fails on dynamo exports; ONNX's own is enough here
            q.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing only helps; quantize the original instead
            log.debug("quant_pre_process failed (%s); quantizing the model as exported", exc)
            prepared = fp32_path
        if scheme == "dynamic":
            # Weights only (MatMulConstBOnly): quantizing activation x activation products
            # (attention scores) loses too much. Per-channel weight scales keep minilm's
            # embeddings at cosine 0.993 to fp32, against 0.965 per tensor.
            q.quantize_dynamic(str(prepared), str(out_path), weight_type=q.QuantType.QInt8,
                               per_channel=True, reduce_range=REDUCE_RANGE,
                               op_types_to_quantize=["MatMul", "Gather"],
                               extra_options={"MatMulConstBOnly": True})
        else:
            if not calibration:
                raise InvalidInput(
                    "static int8 quantization needs calibration data: pass calibration= "
                    "(batch-first arrays, a few hundred real samples) or use scheme='dynamic'")
            names = list(input_names) if input_names else _input_names(prepared)
            reader = _Reader(names, calibration)
            q.quantize_static(str(prepared), str(out_path), reader,
                              quant_format=q.QuantFormat.QDQ, per_channel=True,
                              reduce_range=REDUCE_RANGE, activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax)
    return _check_written(fp32_path, out_path)


def _check_written(fp32_path: Path, out_path: Path) -> Path:
    if not out_path.is_file():
        raise ModelFileError(f"quantization of {fp32_path} produced no file")
    return out_path


def _input_names(path: Path) -> list[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


class _Reader:
    """Feeds calibration batches to ONNX Runtime's calibrator."""

    def __init__(self, names: Sequence[str], arrays: Sequence[np.ndarray]) -> None:
        if len(names) != len(arrays):
            raise InvalidInput(
                f"calibration has {len(arrays)} array(s) but the model takes {len(names)} "
                f"input(s) ({', '.join(names)})")
        self._names = list(names)
        self._arrays = [np.asarray(a) for a in arrays]
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        rows = self._arrays[0].shape[0]
        for start in range(0, rows, CALIBRATION_BATCH):
            yield {n: a[start:start + CALIBRATION_BATCH]
                   for n, a in zip(self._names, self._arrays, strict=True)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


# -- weight-only ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Packed:
    """A MatMulNBits weight: uint8 [N, blocks, block] and fp32 scales [N, blocks]."""

    weight: str
    scales: str
    rows: int  # N, the output features
    cols: int  # K, the input features (blocks * block minus padding)
    blocks: int
    block: int


def _quantize_weight_only(src: Path, out: Path, block_size: int) -> None:
    import onnx

    model = onnx.load(str(src))
    folded = _fold_constant_transposes(model)
    # The output of every MatMul that reads a folded transpose -> the transposed table.
    tied_outputs = {n.output[0]: folded[n.input[1]] for n in model.graph.node
                    if n.op_type == "MatMul" and n.input[1] in folded}
    model = _matmuls_to_nbits(model, block_size)
    tied = _tied_weights(model, tied_outputs)
    gathers = _quantize_gathers(model, tied)
    _drop_unused_initializers(model.graph)
    log.debug("weight-only int8: %d transpose(s) folded, %d gather(s) int8, %d tied",
              len(folded), gathers, len(tied))
    onnx.save(model, str(out))


def _fold_constant_transposes(model: onnx.ModelProto) -> dict[str, str]:
    """Turn each Transpose of an initializer into an initializer; ``{new: source}``.

    A tied output projection is exported as ``MatMul(x, Transpose(embedding))``, which
    the MatMul quantizer skips because its weight is not a constant.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    keep, folded = [], {}
    for node in graph.node:
        if node.op_type != "Transpose" or node.input[0] not in inits:
            keep.append(node)
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        table = numpy_helper.to_array(inits[node.input[0]])
        moved = np.ascontiguousarray(np.transpose(table, perm))
        graph.initializer.append(numpy_helper.from_array(moved, node.output[0]))
        folded[node.output[0]] = node.input[0]
    del graph.node[:]
    graph.node.extend(keep)
    return folded


def _matmuls_to_nbits(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """Every MatMul with a constant 2-D weight -> MatMulNBits (8 bits, symmetric)."""
    with _quiet_nbits_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size,
                                         is_symmetric=True, accuracy_level=4,
                                         op_types_to_quantize=("MatMul",))
        quantizer.process()
    result: onnx.ModelProto = quantizer.model.model
    return result


@contextmanager
def _quiet_nbits_quantizer() -> Iterator[None]:
    """Silence the quantizer's per-node INFO lines and undo its import-time basicConfig.

    Importing ``matmul_nbits_quantizer`` calls ``logging.basicConfig(level=INFO)``, which
    would add a console handler to the root logger and make every library chatty.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quantizer_log = logging.getLogger(_NBITS_LOGGER)
    quantizer_level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
        quantizer_log.setLevel(quantizer_level)


def _tied_weights(model: onnx.ModelProto, tied_outputs: dict[str, str]) -> dict[str, _Packed]:
    """``{embedding table: its transpose's MatMulNBits weight}`` for tied projections."""
    found: dict[str, _Packed] = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) != 3:  # 4th: zero points
            continue
        table = tied_outputs.get(node.output[0].removesuffix("_pre_reshape"))
        if table is None:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        block = attrs["block_size"]
        found[table] = _Packed(node.input[1], node.input[2], attrs["N"], attrs["K"],
                               -(-attrs["K"] // block), block)
    return found


def _quantize_gathers(model: onnx.ModelProto, tied: dict[str, _Packed]) -> int:
    """Replace each Gather of a float 2-D initializer (axis 0) by an int8 lookup."""
    from onnx import TensorProto

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    rows: dict[str, tuple[str, str]] = {}  # table -> its int8 rows and row scales
    nodes, done = [], 0
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or len(table.dims) != 2 or axis != 0
                or table.data_type != TensorProto.FLOAT):
            nodes.append(node)
            continue
        packed = tied.get(table.name)
        if packed is not None and table.name not in rows and _matches(inits, packed, table):
            nodes += _packed_gather(graph, node, packed)
        else:
            if table.name not in rows:
                rows[table.name] = _int8_rows(graph, table)
            nodes += _row_gather(node, *rows[table.name])
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done


def _matches(inits: dict[str, onnx.TensorProto], packed: _Packed,
             proto: onnx.TensorProto) -> bool:
    """Whether ``packed`` dequantizes to the table ``proto`` within one step."""
    from onnx import numpy_helper

    table = numpy_helper.to_array(proto)
    q = numpy_helper.to_array(inits[packed.weight])
    scales = numpy_helper.to_array(inits[packed.scales])
    shape = (packed.rows, packed.blocks)
    if (table.shape != (packed.rows, packed.cols) or q.shape != (*shape, packed.block)
            or scales.size != q.shape[0] * q.shape[1]):
        log.debug("tied weight %s has an unexpected layout; embedding kept apart",
                  packed.weight)
        return False
    scales = scales.reshape(*shape, 1)
    rows = ((q.astype(np.float32) - _NBITS_ZERO_POINT) * scales).reshape(packed.rows, -1)
    step = np.abs(np.repeat(scales[..., 0], packed.block, axis=1)[:, :packed.cols])
    # ORT's scale is the block's extreme value / -128 (so it may be negative), and the
    # opposite extreme clips at 127: one step off at most
    ok = bool((np.abs(rows[:, :packed.cols] - table) <= 1.001 * step).all())
    if not ok:
        log.debug("tied weight %s does not dequantize to its embedding table; embedding "
                  "kept apart", packed.weight)
    return ok


def _packed_gather(graph: onnx.GraphProto, node: onnx.NodeProto,
                   packed: _Packed) -> list[onnx.NodeProto]:
    """Gather rows from a tied projection's MatMulNBits blocks and dequantize them.

    uint8 [*ids, blocks, block] - 128, times the scales [*ids, blocks, 1], flattened to
    [*ids, blocks * block] and cut to the table's width.
    """
    from onnx import TensorProto, helper, numpy_helper

    ids, out, name = node.input[1], node.output[0], node.name or node.output[0]
    p = f"{name}_int8"
    graph.initializer.extend([
        numpy_helper.from_array(np.array(_NBITS_ZERO_POINT, np.float32), f"{p}_zero"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last_axis"),
        numpy_helper.from_array(np.array([packed.blocks * packed.block], np.int64),
                                f"{p}_width"),
        numpy_helper.from_array(np.array([0], np.int64), f"{p}_start"),
        numpy_helper.from_array(np.array([packed.cols], np.int64), f"{p}_cols"),
    ])
    padded = packed.blocks * packed.block != packed.cols
    flat = f"{p}_flat" if padded else out
    nodes = [
        helper.make_node("Gather", [packed.weight, ids], [f"{p}_q"], name=f"{p}_q", axis=0),
        helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{p}_f", f"{p}_zero"], [f"{p}_c"], name=f"{p}_center"),
        helper.make_node("Gather", [packed.scales, ids], [f"{p}_s"], name=f"{p}_scale",
                         axis=0),
        helper.make_node("Unsqueeze", [f"{p}_s", f"{p}_last_axis"], [f"{p}_s1"],
                         name=f"{p}_unsqueeze"),
        helper.make_node("Mul", [f"{p}_c", f"{p}_s1"], [f"{p}_d"], name=f"{p}_dequant"),
        helper.make_node("Shape", [ids], [f"{p}_ids_shape"], name=f"{p}_shape"),
        helper.make_node("Concat", [f"{p}_ids_shape", f"{p}_width"], [f"{p}_out_shape"],
                         name=f"{p}_concat", axis=0),
        helper.make_node("Reshape", [f"{p}_d", f"{p}_out_shape"], [flat], name=f"{p}_flat"),
    ]
    if padded:
        nodes.append(helper.make_node("Slice", [flat, f"{p}_start", f"{p}_cols",
                                                f"{p}_last_axis"], [out], name=f"{p}_cut"))
    return nodes


def _int8_rows(graph: onnx.GraphProto, proto: onnx.TensorProto) -> tuple[str, str]:
    """Add ``proto`` as int8 rows and per-row fp32 scales; return both names."""
    from onnx import numpy_helper

    table = numpy_helper.to_array(proto)
    scale = np.abs(table).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)
    names = f"{proto.name}_int8", f"{proto.name}_row_scale"
    graph.initializer.extend([numpy_helper.from_array(q, names[0]),
                              numpy_helper.from_array(scale.astype(np.float32), names[1])])
    return names


def _row_gather(node: onnx.NodeProto, rows: str, scales: str) -> list[onnx.NodeProto]:
    """``Cast(Gather(int8 rows, ids)) * Gather(row scales, ids)``."""
    from onnx import TensorProto, helper

    ids, out = node.input[1], node.output[0]
    p = f"{node.name or out}_int8"
    return [
        helper.make_node("Gather", [rows, ids], [f"{p}_q"], name=f"{p}_q", axis=0),
        helper.make_node("Gather", [scales, ids], [f"{p}_s"], name=f"{p}_scale", axis=0),
        helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}_f", f"{p}_s"], [out], name=f"{p}_dequant"),
    ]


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
