"""TensorRT backend: a TensorRT-conformant QDQ graph per precision, a serialized plan per graph, and a
runner whose engines share one device-memory allocation.

Why a graph of its own (``write_qdq_tensorrt``), not the ONNX Runtime one (``qdq.py``)
-------------------------------------------------------------------------------------
TensorRT takes its precisions from the graph only (explicit quantization; strongly typed networks:
TensorRT 10 needs the STRONGLY_TYPED flag, TensorRT 11 has no precision builder flags at all), and
its Q/DQ rules differ from ONNX Runtime's (``ptqd.engines.tensorrt.lint`` checks them on the CPU):

  ONNX Runtime graph                         TensorRT graph (this module)
  ----------------------------------------   -------------------------------------------------------
  activations uint8, asymmetric (z != 0)     int8, symmetric (z = 0): s = max(|lo|, |hi|) / 127 from
                                             the calibrated range [lo, hi]          <- recorded choice
  4-bit activations: Clip to [lo, hi], u8    Clip to ±7·s, int8 Q/DQ (s = max(|lo|, |hi|) / 7): the
                                             4-bit symmetric grid on int8 kernels
  weights int8 per output channel, z = 0     same integers, same scales (already symmetric)
  4-bit MatMul weights on the int8 grid      true INT4, weight-only, 2-D block scales (block 128 or
                                             64 along K; each block carries its channel's scale, so
                                             the numerics are the calibrated ones); TensorRT has no
                                             INT4 activations and no INT4 convolution, so these
                                             MatMuls read FP16 activations (W4A16)
  conv bias int32 at s_x·s_w                 float bias (TensorRT wants the bias float)
  conv outputs requantized to 8 bits         no output Q/DQ: TensorRT fuses Q/DQ into the layers'
                                             inputs and weights; outputs stay FP16
  FP32 everywhere else                       FP16 everywhere else, except the time-embedding path
                                             (everything computed from ``t`` alone) which stays
                                             FP32: in fp16, t·freq near t = 1000 rounds to steps of
                                             0.5, a phase error of up to 0.25 rad in the sinusoid's
                                             fastest components; the path is a few kMACs
  opset 18                                   opset 21 (INT4 and block-quantized DequantizeLinear,
                                             FP16 Q/DQ scales), via onnx.version_converter
  graph inputs/outputs FP32                  FP32 too (Cast at the boundary): the runner interface
                                             stays numpy float32

So the TensorRT engines compute the precision their name says with a *symmetric* activation grid;
they are compared against ONNX Runtime running the same graph (``scripts/tensorrt_gpu_check.py``),
not against the asymmetric fake-quant model. Every choice is returned by the writer and recorded in
``build.json``.

Heavy imports (``tensorrt``, ``polygraphy``, the CUDA runtime) happen inside functions: importing
this module needs numpy only, and every TensorRT-touching function first calls
:func:`require_tensorrt`, which says what to install in one line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.engines.onnx_io import load_model
from ptqd.engines.qdq import node_key
from ptqd.engines.tensorrt.options import INT4_BLOCK_SIZES, KEEP_FP32_INPUTS, TRT_OPSET, TrtOptions
from ptqd.errors import UserError

# ---- FP16 conversion ----------------------------------------------------------------------------
_DTYPE_ATTR_OPS = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "EyeLike",
                   "Multinomial", "Bernoulli")
_SUBGRAPH_OPS = ("If", "Loop", "Scan")


def convert_float16(model, keep_fp32_inputs: Sequence[str] = KEEP_FP32_INPUTS) -> dict[str, Any]:
    """Convert ``model`` (in place) to FP16 compute, keeping graph inputs/outputs FP32.

    Nodes fall in three groups, in topological order:
      constant  all inputs constant (initializers, Constant nodes, or other constant nodes): left as
                they are; a float constant is converted where an FP16 node reads it (a stored one by
                an FP16 copy, a computed one by a Cast)
      fp32      computed only from ``keep_fp32_inputs`` (and constants): the time-embedding path
      fp16      everything else
    An FP16 node's float input is converted when its schema ties that input's type to the output's
    (Conv's W and B, Mul's operands, LayerNormalization's scale...), and not where the schema fixes
    it (Resize's ``scales`` is always float32) or leaves it free (Shape's data). Cast(to=FLOAT) and
    ConstantOfShape(float value) in the FP16 region are retargeted to FLOAT16.
    Returns {"fp32_nodes": [...], "fp16_nodes": n, "casts": n}.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(g.input) + list(g.output):
        dtype[vi.name] = vi.type.tensor_type.elem_type
    inits = {i.name: i for i in g.initializer}
    for i in g.initializer:
        dtype[i.name] = i.data_type
    const_node_value = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    dtype[n.output[0]] = a.t.data_type
                    const_node_value[n.output[0]] = a.t
                elif a.name in ("value_float", "value_floats"):
                    dtype[n.output[0]] = TensorProto.FLOAT

    const, fp32 = set(inits), {i.name for i in g.input if i.name in keep_fp32_inputs}
    kind: dict[int, str] = {}
    fp32_nodes: list[str] = []
    for k, n in enumerate(g.node):
        if n.op_type in _SUBGRAPH_OPS:
            raise UserError(f"{n.name}: control flow ({n.op_type}) is not supported by ptqd's FP16 conversion")
        ins = [i for i in n.input if i]
        if all(i in const for i in ins):
            kind[k] = "const"
            const.update(n.output)
        elif all(i in const or i in fp32 for i in ins):
            kind[k] = "fp32"
            fp32.update(n.output)
            fp32_nodes.append(n.name)
        else:
            kind[k] = "fp16"

    f16_of: dict[str, str] = {}  # float32 tensor -> its FP16 counterpart
    produced_f16: set[str] = set()
    new_inits, nodes, casts = [], [], 0

    def as_f16(name: str) -> str:
        nonlocal casts
        if name in f16_of:
            return f16_of[name]
        new = f"{name}__f16"
        if name in inits:
            new_inits.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), new))
        elif name in const_node_value:
            arr = numpy_helper.to_array(const_node_value[name]).astype(np.float16)
            nodes.append(helper.make_node("Constant", [], [new], value=numpy_helper.from_array(arr, new),
                                          name=f"{new}_Constant"))
        else:  # a graph input, an FP32-path tensor or a computed constant
            nodes.append(helper.make_node("Cast", [name], [new], to=TensorProto.FLOAT16, name=f"{new}_Cast"))
            casts += 1
        f16_of[name] = new
        return new

    for k, n in enumerate(g.node):
        if kind[k] == "fp16":
            if n.op_type in _DTYPE_ATTR_OPS:
                raise UserError(f"{n.name}: {n.op_type} has a dtype attribute ptqd's FP16 conversion does not handle")
            schema = onnx.defs.get_schema(n.op_type, opset, n.domain)
            out_types = {o.type_str for o in schema.outputs}
            for i, name in enumerate(n.input):
                if not name or name in produced_f16 or dtype.get(name) != TensorProto.FLOAT:
                    continue
                formal = schema.inputs[min(i, len(schema.inputs) - 1)]
                if formal.type_str in out_types and not formal.type_str.startswith("tensor("):
                    n.input[i] = as_f16(name)
            for a in n.attribute:
                if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                    a.i = TensorProto.FLOAT16
                if n.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
            produced_f16.update(o for o in n.output if dtype.get(o) in (TensorProto.FLOAT, None))
        nodes.append(n)

    # graph outputs computed in FP16 get a Cast back to FLOAT under their own name
    tail = []
    for out in g.output:
        if out.name in produced_f16:
            raw = f"{out.name}__f16"
            for n in nodes:
                for field in (n.input, n.output):
                    for j, name in enumerate(field):
                        if name == out.name:
                            field[j] = raw
            tail.append(helper.make_node("Cast", [raw], [out.name], to=TensorProto.FLOAT, name=f"{out.name}_Cast"))
            casts += 1
    del g.node[:]
    g.node.extend(nodes + tail)
    g.initializer.extend(new_inits)
    _drop_unused(model)
    del g.value_info[:]
    return {"fp32_nodes": sorted(fp32_nodes), "fp16_nodes": sum(v == "fp16" for v in kind.values()), "casts": casts}


def _drop_unused(model) -> None:
    """Remove initializers and Constant nodes nothing reads any more (the FP32 originals of FP16 copies)."""
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if n.op_type == "Constant" and n.output[0] not in used]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


# ---- quantizer math ------------------------------------------------------------------------------
def symmetric_act_scale(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """TensorRT's symmetric per-tensor quantizer covering the calibrated range [lo, hi].

    q_max = 2^(b-1) - 1 (127 for 8 bits; 7 for 4 bits, on int8 storage behind a Clip to ±7·s)
    s = max(|lo|, |hi|) / q_max,  z = 0,  x̂ = s · clamp(round_half_even(x / s), -q_max - 1, q_max)
    The calibrated range comes from the asymmetric (uint8) quantizer; a symmetric grid over the same
    range spends half its levels on the side the data barely reaches (post-SiLU activations): one
    bit of resolution for the sign TensorRT requires. Returns (s, q_max).
    """
    qmax = 2 ** (bits - 1) - 1
    amax = max(abs(float(lo)), abs(float(hi)), 1e-8)
    return amax / qmax, qmax


def int4_block_size(k: int, n: int) -> int | None:
    """Block size for an INT4 MatMul weight [K, N]: the largest TensorRT block size dividing K (None
    when none does, or N is odd: INT4 packs two values per byte along the last dimension)."""
    if n % 2:
        return None
    return next((bs for bs in INT4_BLOCK_SIZES if k % bs == 0), None)


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _checked_scale(arr, dtype, what: str) -> np.ndarray:
    """Scales in the graph's float type; an FP16 scale that underflows to 0 or overflows is a hard error."""
    out = np.asarray(arr, dtype=np.float64).astype(dtype)
    if not np.all(np.isfinite(out)) or np.any(out <= 0):
        raise UserError(f"{what}: a scale is not representable in {np.dtype(dtype).name} "
                        f"(min {np.min(arr):.3g}, max {np.max(arr):.3g}); build with float_dtype='float32'")
    return out


def write_qdq_tensorrt(fp_onnx: str | os.PathLike, layers: Sequence, out_path: str | os.PathLike,
                       options: TrtOptions | None = None) -> dict[str, Any]:
    """Write the TensorRT QDQ graph of one precision (``layers``: the calibration's LayerQuant list;
    empty: the plain FP16 graph, the baseline engine). Returns what was done, for ``build.json``.

    Per quantized layer (the names of the ONNX Runtime writer, ``qdq.py``, where they mean the same):

      x ─[Clip ±7s]─ Q(int8, s, z=0) ─ DQ ─┐                  (Clip for 4-bit activations only)
      W ─ DQ(int8, scales[C_out], axis) ───┴─ Conv / MatMul ─►  float output, float bias
      W ─ DQ(INT4, scales[K/bs, N], block_size=bs, axis=0) ─ MatMul   (4-bit MatMul weights:
                                                                       weight-only, FP16 input)
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    opts = options or TrtOptions()
    opts.validate()
    model = load_model(fp_onnx)
    src_opset = _default_opset(model)
    if src_opset < TRT_OPSET:
        model = version_converter.convert_version(model, TRT_OPSET)
    record: dict[str, Any] = {
        "target": "tensorrt",
        "opset": {"source": src_opset, "graph": max(src_opset, TRT_OPSET),
                  "converted_by": "onnx.version_converter" if src_opset < TRT_OPSET else None},
        "float_dtype": opts.float_dtype,
        "activation_quantizer": "symmetric int8 per tensor, z = 0: s = max(|lo|, |hi|) / 127 (4-bit: / 7 with "
                                "a Clip to ±7s) from the calibrated range [lo, hi]; the ONNX Runtime graphs "
                                "use the asymmetric uint8 quantizer, TensorRT has no asymmetric quantization",
        "weights": "calibrated integers and per-output-channel scales, unchanged",
        "conv_outputs": "not requantized (TensorRT fuses Q/DQ into layer inputs); the ONNX Runtime graphs "
                        "requantize conv outputs to 8 bits",
        "bias": "float",
    }
    if opts.float_dtype == "float16":
        conv = convert_float16(model)
        record["fp32_path"] = {"why": "computed from t alone (timestep embedding): fp16 cannot hold t·freq "
                                      "for t near 1000", "nodes": len(conv["fp32_nodes"])}
    g = model.graph
    nodes = {n.name: n for n in g.node}
    inits = {i.name: i for i in g.initializer}
    inferred = onnx.shape_inference.infer_shapes(model)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(inferred.graph.value_info) + list(g.input)}
    elem.update({i.name: i.data_type for i in g.initializer})
    np_of = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}

    new_inits: list = []
    before: dict[str, list] = {}
    per_layer, int4_layers = [], []

    def const(name, arr):
        new_inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    for lq in layers:
        node = nodes.get(lq.name)
        if node is None:
            raise UserError(f"node {lq.name!r} from the calibration is not in {Path(fp_onnx).name}: re-run calibrate")
        if lq.op not in ("Conv", "MatMul"):
            raise UserError(f"{lq.name}: ptqd writes Conv and MatMul layers, got {lq.op}")
        base = node_key(lq.name)
        ftype = np_of.get(elem.get(node.input[0]))
        if ftype is None:
            raise UserError(f"{lq.name}: input {node.input[0]} is not a float tensor in the TensorRT graph")
        w_int = lq.w_int if lq.op == "Conv" else lq.w_int.T.copy()  # MatMul: [K, N], output axis 1
        old_w = node.input[1]
        if old_w not in inits:
            raise UserError(f"{lq.name}: weight {old_w} is not an initializer")
        if tuple(inits[old_w].dims) != w_int.shape:
            raise UserError(f"{lq.name}: weight shape {tuple(inits[old_w].dims)} != calibrated {w_int.shape}")
        bs = int4_block_size(*w_int.shape) if lq.op == "MatMul" and w_int.ndim == 2 else None
        int4 = bool(opts.int4_matmul and lq.w_bits == 4 and bs and np.abs(w_int).max() <= 7)
        pre: list = []
        row: dict[str, Any] = {"name": lq.name, "op": lq.op, "w_bits": lq.w_bits, "a_bits": lq.a_bits}
        # activation: symmetric per-tensor int8 (4-bit: int8 grid clipped to ±7); none for INT4 weight-only
        if int4:
            row["activations"] = opts.float_dtype
        else:
            lo, hi = lq.act_in.range
            s, qmax = symmetric_act_scale(lo, hi, lq.a_bits)
            sx = _checked_scale(s, ftype, f"{lq.name} input scale")
            x = node.input[0]
            if lq.a_bits < 8:
                pre.append(helper.make_node("Clip", [x, const(f"{base}_clip_lo", (-qmax * sx).astype(ftype)),
                                                     const(f"{base}_clip_hi", (qmax * sx).astype(ftype))],
                                            [f"{base}_xc"], name=f"{base}_Clip"))
                x = f"{base}_xc"
            sxn = const(f"{base}_x_scale", sx)
            zx = const(f"{base}_x_zp", np.array(0, np.int8))
            pre.append(helper.make_node("QuantizeLinear", [x, sxn, zx], [f"{base}_xq"], name=f"{base}_QuantizeLinear_x"))
            pre.append(helper.make_node("DequantizeLinear", [f"{base}_xq", sxn, zx], [f"{base}_xd"],
                                        name=f"{base}_DequantizeLinear_x"))
            node.input[0] = f"{base}_xd"
            row["activations"] = "int8" if lq.a_bits == 8 else f"int8 grid ±{qmax} ({lq.a_bits}-bit)"
            row["x_scale"] = float(sx)
        ws = _checked_scale(lq.w_scale, ftype, f"{lq.name} weight scales")
        if int4:
            k, n = w_int.shape
            wq = helper.make_tensor(f"{base}_w_int4", TensorProto.INT4, [k, n], w_int.astype(np.int8).ravel().tolist())
            new_inits.append(wq)
            wsn = const(f"{base}_w_scale", np.tile(ws[None, :], (k // bs, 1)))  # [K/bs, N]: each block its channel's s
            pre.append(helper.make_node("DequantizeLinear", [wq.name, wsn], [f"{base}_wd"], axis=0, block_size=bs,
                                        name=f"{base}_DequantizeLinear_w"))
            row["weights"] = f"int4 blocks of {bs} along K"
            int4_layers.append(lq.name)
        else:
            wq = const(f"{base}_w_int8", w_int.astype(np.int8))
            wsn = const(f"{base}_w_scale", ws)
            pre.append(helper.make_node("DequantizeLinear", [wq, wsn], [f"{base}_wd"], axis=0 if lq.op == "Conv" else 1,
                                        name=f"{base}_DequantizeLinear_w"))
            row["weights"] = "int8 per channel" + (f" ({lq.w_bits}-bit grid)" if lq.w_bits < 8 else "")
        node.input[1] = f"{base}_wd"
        before[lq.name] = pre
        per_layer.append(row)

    ordered = []
    for n in g.node:
        ordered += before.get(n.name, []) + [n]
    del g.node[:]
    g.node.extend(ordered)
    g.initializer.extend(new_inits)
    _drop_unused(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save_model(model, str(out_path))
    counts: dict[str, int] = {}
    for r in per_layer:
        key = f"{r['op']}: {r['weights']}, activations {r['activations']}"
        counts[key] = counts.get(key, 0) + 1
    record.update({"quantized_nodes": len(per_layer), "layers": counts, "int4_weight_only_layers": len(int4_layers),
                   "per_layer": per_layer})
    if int4_layers:
        record["int4"] = (f"{len(int4_layers)} MatMul layers with 4-bit weights run INT4 weight-only (TensorRT has no "
                          f"INT4 activations): their inputs are {opts.float_dtype}, not quantized")
    return record


def numerics_summary(record: dict[str, Any]) -> str:
    """One line for build.json: what the engine computes (cf. the ONNX Runtime backend's ``numerics``)."""
    if not record.get("quantized_nodes"):
        return f"{record['float_dtype']} (no quantized layers; timestep embedding fp32)"
    parts = [f"{v} x {k}" for k, v in record["layers"].items()]
    return (f"TensorRT explicit quantization, symmetric int8 activations per tensor (z = 0); "
            f"{'; '.join(parts)}; other layers {record['float_dtype']}")


# ---- build configuration ------------------------------------------------------------------------
def graph_inputs(path_or_model) -> dict[str, tuple[int | None, ...]]:
    """{input name: dims} of an ONNX graph, None for a dynamic dimension."""
    import onnx

    model = onnx.load(str(path_or_model), load_external_data=False) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model
    inits = {i.name for i in model.graph.initializer}
    return {i.name: tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                          for d in i.type.tensor_type.shape.dim)
            for i in model.graph.input if i.name not in inits}
