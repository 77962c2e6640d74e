"""QDQ graph writer: FP ONNX + calibrated layers -> one explicit-quantization ONNX per precision.

For each quantized node (addressed by its layer-table name):

  x ─[Clip]─ QuantizeLinear(u8) ─[Clip]─ DequantizeLinear ─┐
  W_int8 ─ DequantizeLinear(axis = out axis) ──────────────┼─ Conv ─ Q ─ DQ ─►
  b_int32 ─ DequantizeLinear(s_x·s_w) (Conv) ──────────────┘   MatMul ─────────►  (no output Q: float output)

A Clip keeps a < 8-bit activation on its grid: on the floats before the QuantizeLinear, or on its integers after
it (``low_bits_clip``); 8-bit activations have none.

ONNX Runtime fuses these into QLinearConv and MatMulIntegerToFloat (int8 kernels); 4-bit numerics
run on those int8 kernels with values restricted to the 4-bit grid. Scales are constants.

A quantized attention matmul (``calib.attention``, ``--attention qk|int8``) gets a QuantizeLinear(u8) ─
DequantizeLinear pair on each of its two activation inputs and no output Q: MatMulIntegerToFloat on ONNX
Runtime, an integer MatMul on OpenVINO.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqd.engines.onnx_io import graph_index, read_external, save_model


def node_key(name: str) -> str:
    """The tensor-name prefix the QDQ writers give a layer-table node name (``/a/b.c`` -> ``a_b_c``)."""
    return name.strip("/").replace("/", "_").replace(".", "_")


def _gemm_as_matmul(node, inits, base) -> list:
    """Turn a Gemm (y = x·Wᵀ + b, transB = 1, alpha = beta = 1: torch's Linear on a 2-D input) into
    MatMul(x, Wᵀ) + Add(b) in place, so that its QDQ form fuses into MatMulIntegerToFloat like every
    other linear layer. Returns the Add node (to insert after it); the weight becomes [K, N]."""
    from onnx import helper, numpy_helper

    at = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if at.get("transA", 0) or at.get("alpha", 1.0) != 1.0 or at.get("beta", 1.0) != 1.0:
        raise ValueError(f"{node.name}: only Gemm with transA = 0, alpha = beta = 1 can be quantized")
    w = numpy_helper.to_array(inits[node.input[1]])
    if not at.get("transB", 0):
        w = w.T
    node.input[1] = f"{base}_w_fp"  # [K, N]: only its shape is read (the int8 weight replaces it)
    inits[node.input[1]] = numpy_helper.from_array(np.ascontiguousarray(w.T, np.float32), node.input[1])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    del node.input[2:]
    del node.attribute[:]
    node.op_type = "MatMul"
    if bias is None:
        return []
    y = node.output[0]
    node.output[0] = f"{base}_mm"
    return [helper.make_node("Add", [f"{base}_mm", bias], [y], name=f"{base}_Add_bias")]


LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


def _layout_source(node, slot: int, producer: dict, readers: dict, graph_outputs: set):
    """(reader, input slot) where input ``slot`` of ``node`` comes from through layout ops alone: each step up
    needs a layout op whose output only its one reader uses (Shape readers aside: they read no values) and that
    is not a graph output (whose float values would become quantized ones)."""
    while True:
        t = node.input[slot]
        src = producer.get(t)
        values_read_by = [r for r in readers.get(t, []) if r.op_type != "Shape"]
        if src is None or src.op_type not in LAYOUT_OPS or len(values_read_by) != 1 or t in graph_outputs:
            return node, slot
        node, slot = src, 0


def write_qdq(fp_onnx: Path, layers, out_path: Path, rewrite=None, attention=(), attention_at: str = "input",
              signed: bool = False, inputs_at: str = "input", signed_low_bits: bool = False,
              low_bits_clip: str = "float") -> dict:
    """Write the QDQ model; returns {"quantized_nodes": n} and what ``rewrite(model)`` (a graph rewrite applied
    before saving, e.g. :func:`ptqd.engines.graph_opt.optimize_for_ort`) returned, under "graph".
    ``attention``: the quantized attention matmuls (``calib.attention.MatMulQuant``). ``attention_at``: where
    their Q/DQ pairs go: "input" (on the matmul's inputs) or "source" (moved up through the layout ops that feed
    each input, Reshape/Transpose/..., to where the tensor is made: the q/k/v projection's or the Softmax's
    output, where OpenVINO can fuse the quantizer into its producer). Per-tensor quantization commutes with
    layout ops, so both compute the same values. ``signed``: an 8-bit activation quantizer whose zero point is
    128 (a symmetric grid around 0) is written as int8 with zero point 0: the same values (q − 128), in the form
    OpenVINO's CPU plugin runs on its signed int8 kernels (:func:`ptqd.engines.openvino.openvino_layers`).
    ``inputs_at``: the same choice as ``attention_at`` for the layers' input quantizers: "source" puts the Q/DQ of
    a conv or matmul that reads its input through layout ops (a transformer's proj_out after the tokens are
    transposed back to NCHW) where that tensor is made, so OpenVINO moves int8 values, not float ones, through
    the Transpose. Not where the source is a MatMul (attention's heads merged before its output projection).
    ``signed_low_bits``: a 4-bit (any < 8-bit) input quantizer is written as int8 with zero point 0 behind its
    Clip: its 16 levels (j − z)·s, j = 0..15, are the integers −z..15 − z times s, which int8 holds as they are,
    so the values are the same and the kernel needs no zero point (OpenVINO's faster signed kernels on AMX).
    ``low_bits_clip``: where a < 8-bit input is held to its grid: "float" (a Clip to [lo, hi] before its
    QuantizeLinear) or "int" (a Clip of the 8-bit integers to the grid's after it: the same integers, since
    rounding is monotonic and the saturation edges are grid points, and a pass over bytes instead of floats;
    ONNX Runtime then also fuses a v projection that feeds such an input into QLinearMatMul)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(fp_onnx), load_external_data=False)
    by_name = {n.name: n for n in model.graph.node}
    replaced = {by_name[lq.name].input[1] for lq in layers if lq.name in by_name and lq.op != "Gemm"}
    read_external(model, fp_onnx, skip=replaced)  # the float weights the int8 ones replace stay on disk
    g = model.graph
    nodes = {n.name: n for n in g.node}
    inits = {i.name: i for i in g.initializer}
    new_inits, inserted_before, inserted_after, shared_q = [], {}, {}, {}
    moved = 0  # layer input quantizers moved up to their layout source (inputs_at="source")

    def const(name, arr):
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    def zero_point(name, a):
        if (signed and a.int8_symmetric) or (signed_low_bits and a.bits < 8):
            return const(name, np.array(0, np.int8))
        return const(name, np.array(a.zero_point, np.uint8))

    if attention_at not in ("input", "source") or inputs_at not in ("input", "source"):
        raise ValueError(f"attention_at and inputs_at must be 'input' or 'source', got {attention_at!r}, "
                         f"{inputs_at!r}")
    order = {n.name: i for i, n in enumerate(g.node)}  # graph order: a shared Q comes before its readers
    # who makes and reads each tensor in the graph as exported (before the layers' quantizers rename inputs):
    # a tensor that also feeds a quantized layer stops an attention quantizer's move to its source
    producer, readers, graph_outputs = graph_index(g)
    for lq in sorted(layers, key=lambda lq: order.get(lq.name, -1)):
        node = nodes.get(lq.name)
        if node is None:
            raise ValueError(f"node {lq.name!r} from the calibration is not in {fp_onnx.name}: re-run calibrate")
        base = node_key(lq.name)
        pre, post = [], []
        if lq.op == "Gemm":
            post += _gemm_as_matmul(node, inits, base)
        # activation input: one QuantizeLinear per (tensor, quantizer), shared by the layers that read the
        # same tensor on the same grid (a transformer block's q/k/v, every block's context k/v); each
        # layer keeps its own DequantizeLinear (ONNX Runtime fuses one per integer kernel)
        reader, slot = node, 0  # where the input's Q/DQ go: on the layer's input, or up at its layout source
        if inputs_at == "source":
            reader, slot = _layout_source(node, 0, producer, readers, graph_outputs)
            src = producer.get(reader.input[slot])
            if src is not None and src.op_type == "MatMul":  # attention's P·V: the one-key rewrite
                reader, slot = node, 0  # (graph_opt.fuse_attention) matches the head merge as exported
        x = reader.input[slot]
        a = lq.act_in
        key = (x, float(np.float32(a.scale)), int(a.zero_point), a.bits, tuple(a.range) if a.bits < 8 else None,
               None if reader is node else reader.name)  # a moved Q is its own: sharing could break graph order
        sx = const(f"{base}_x_scale", np.array(a.scale, np.float32))
        zx = zero_point(f"{base}_x_zp", a)
        if key in shared_q:
            pre.append(helper.make_node("DequantizeLinear", [shared_q[key], sx, zx], [f"{base}_xd"],
                                        name=f"{base}_DequantizeLinear_x"))
            x = None
        elif a.bits < 8 and low_bits_clip == "float":
            lo, hi = a.range
            pre.append(helper.make_node("Clip", [x, const(f"{base}_clip_lo", np.array(lo, np.float32)),
                                                 const(f"{base}_clip_hi", np.array(hi, np.float32))],
                                        [f"{base}_xc"], name=f"{base}_Clip"))
            x = f"{base}_xc"
        if x is not None:
            shared_q[key] = f"{base}_xq"
            clip_int = a.bits < 8 and low_bits_clip == "int"  # the same grid, clipped after rounding
            pre.append(helper.make_node("QuantizeLinear", [x, sx, zx], [f"{base}_xq8" if clip_int else f"{base}_xq"],
                                        name=f"{base}_QuantizeLinear_x"))
            if clip_int:
                lo_q, hi_q = ((np.int8(-a.zero_point), np.int8(a.qmax - a.zero_point)) if signed_low_bits
                              else (np.uint8(0), np.uint8(a.qmax)))
                pre.append(helper.make_node("Clip", [f"{base}_xq8", const(f"{base}_clip_lo", np.array(lo_q)),
                                                     const(f"{base}_clip_hi", np.array(hi_q))],
                                            [f"{base}_xq"], name=f"{base}_Clip"))
            pre.append(helper.make_node("DequantizeLinear", [f"{base}_xq", sx, zx], [f"{base}_xd"],
                                        name=f"{base}_DequantizeLinear_x"))
        reader.input[slot] = f"{base}_xd"
        if reader is not node:
            moved += 1
            inserted_before.setdefault(reader.name, []).extend(pre)
            pre = []
        # weight: torch layout [C_out, ...]; ONNX MatMul wants [K, N] with the output axis 1
        w_int = lq.w_int if lq.op == "Conv" else lq.w_int.T.copy()  # Gemm: already a MatMul here
        axis = 0 if lq.op == "Conv" else 1
        old_w = node.input[1]
        if old_w not in inits:
            raise ValueError(f"{lq.name}: weight {old_w} is not an initializer")
        if tuple(inits[old_w].dims) != w_int.shape:
            raise ValueError(f"{lq.name}: weight shape {tuple(inits[old_w].dims)} != calibrated {w_int.shape}")
        wq = const(f"{base}_w_int8", w_int.astype(np.int8))
        ws = const(f"{base}_w_scale", lq.w_scale.astype(np.float32))
        wz = const(f"{base}_w_zp", np.zeros(len(lq.w_scale), np.int8))
        pre.append(helper.make_node("DequantizeLinear", [wq, ws, wz], [f"{base}_wd"], axis=axis,
                                    name=f"{base}_DequantizeLinear_w"))
        node.input[1] = f"{base}_wd"
        if lq.op == "Conv" and len(node.input) > 2 and lq.bias_q is not None:
            bq = const(f"{base}_b_int32", lq.bias_q.astype(np.int32))
            bs = const(f"{base}_b_scale", lq.bias_scale.astype(np.float32))
            bz = const(f"{base}_b_zp", np.zeros(len(lq.bias_q), np.int32))
            pre.append(helper.make_node("DequantizeLinear", [bq, bs, bz], [f"{base}_bd"], axis=0,
                                        name=f"{base}_DequantizeLinear_b"))
            node.input[2] = f"{base}_bd"
        if lq.act_out is not None:
            y = node.output[0]
            raw = f"{base}_y"
            node.output[0] = raw
            sy = const(f"{base}_y_scale", np.array(lq.act_out.scale, np.float32))
            zy = zero_point(f"{base}_y_zp", lq.act_out)
            post.append(helper.make_node("QuantizeLinear", [raw, sy, zy], [f"{base}_yq"], name=f"{base}_QuantizeLinear_y"))
            post.append(helper.make_node("DequantizeLinear", [f"{base}_yq", sy, zy], [y], name=f"{base}_DequantizeLinear_y"))
        inserted_before.setdefault(lq.name, []).extend(pre)
        inserted_after[lq.name] = post
    for mq in attention:  # both inputs of a quantized attention matmul on their 8-bit grids
        node = nodes.get(mq.name)
        if node is None or node.op_type != "MatMul":
            raise ValueError(f"attention matmul {mq.name!r} from the calibration is not in {fp_onnx.name}: "
                             "re-run calibrate")
        base = node_key(mq.name)
        for i, (side, a) in enumerate((("a", mq.a), ("b", mq.b))):
            reader, slot = node, i
            if attention_at == "source":
                reader, slot = _layout_source(node, i, producer, readers, graph_outputs)
            sx = const(f"{base}_{side}_scale", np.array(a.scale, np.float32))
            zx = zero_point(f"{base}_{side}_zp", a)
            inserted_before.setdefault(reader.name, []).extend([
                helper.make_node("QuantizeLinear", [reader.input[slot], sx, zx], [f"{base}_{side}q"],
                                 name=f"{base}_QuantizeLinear_{side}"),
                helper.make_node("DequantizeLinear", [f"{base}_{side}q", sx, zx], [f"{base}_{side}d"],
                                 name=f"{base}_DequantizeLinear_{side}")])
            reader.input[slot] = f"{base}_{side}d"
    # rebuild the node list in topological order, dropping weights no longer used
    ordered = []
    for n in g.node:
        ordered += inserted_before.get(n.name, []) + [n] + inserted_after.get(n.name, [])
    del g.node[:]
    g.node.extend(ordered)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + new_inits)
    read_external(model, fp_onnx)  # a skipped weight that another node still reads (none in ptqd's graphs)
    rec = {"quantized_nodes": len(layers), "inputs_moved_to_source": moved,
           **({"quantized_attention_matmuls": len(attention)} if attention else {})}
    if rewrite is not None:
        rec["graph"] = rewrite(model)
    rec["files"] = [f.name for f in save_model(model, out_path)]
    return rec
