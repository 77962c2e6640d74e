"""Layer-local engine validation: every integer kernel of a built ONNX Runtime engine, checked on its
own inputs against the integer math it must compute, and its constants against the calibration.

Why local: the engine and the fake-quant model compute the same integers, but the float ops between
the quantized layers (GroupNorm, SiLU, softmax, ...) round differently in torch and ONNX Runtime, and
now and then one value lands on the other side of a quantization tie. In a trained UNet such a
1-LSB flip stays a flip (engine vs fake-quant: 2e-7 rel-L2 on the demo). In a quantized network
that amplifies them it does not: on a 47 M-parameter cin256-v2-family UNet with random weights, one
flipped element after a GroupNorm became 38 flips in the next conv's input, 1,700 in the attention
projections and 11,000 in the feed-forward, and ε differed by 2-35 % although every QLinearConv
reproduced its integers exactly. An end-to-end comparison cannot separate that cascade from a
wrong kernel; this check can:

  QLinearConv            q_y = clamp(round(float32(Σ (q_x − z_x)·q_w + q_b) · M_c) + z_y, 0, 255),
                         M_c = float32(s_x·s_w[c]) / s_y: identical integers required
  MatMulIntegerToFloat   y = float32(Σ (q_x − z_x)·(q_w − z_w)) · float32(s_x·s_w[c]) (+ bias): within 1e-6
                         (z_w = 0 for weights; a quantized attention matmul's second input has its own)
  QLinearMatMul          q_y = clamp(round(float32(Σ (q_a − z_a)·(q_b − z_b)) · M) + z_y, 0, 255),
                         M = float32(s_a·s_b) / s_y (an attention P·V whose output ONNX Runtime requantizes
                         for the next layer's input quantizer): identical integers required
  constants              s_x, z_x, s_w, q_w of every quantized layer, and both input grids of every
                         quantized attention matmul, equal the calibration's
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ptqd.engines.onnx_io import external_size, load_model, save_model
from ptqd.engines.packed import expand_initializers
from ptqd.engines.qdq import node_key

FLOAT_KERNEL_RTOL = 1e-6


def check_kernels(engine_path: str | Path, layers, feeds: dict, attention=()) -> dict:
    """Run the engine once on ``feeds`` with every integer kernel's inputs and outputs exposed; recompute
    each kernel (torch, float64 exact integers). Returns {"kernels", "mismatched": [...], "constants_ok",
    "constant_mismatches": [...], "passed"}."""
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper

    model = load_model(engine_path)
    expand_initializers(model)  # packed 4-bit weights (ptqd.engines.packed): the int8 tensors the kernels read
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    kernels = [n for n in model.graph.node if n.op_type in ("QLinearConv", "MatMulIntegerToFloat", "QLinearMatMul")]
    need = sorted({x for n in kernels for x in [*n.input, *n.output] if x and x not in inits})
    del model.graph.output[:]
    model.graph.output.extend([helper.make_empty_tensor_value_info(x) for x in need])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the engine is already optimized
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="ptqd-kernels-") as tmp:
        # over 2 GB, protobuf cannot serialize the model: ONNX Runtime reads it from a file with external data
        src = str(save_model(model, Path(tmp) / "k.onnx", check=False)[0]) if external_size(model) else model.SerializeToString()
        sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    vals = dict(zip(need, sess.run(need, {k: v for k, v in feeds.items() if k in names})))
    del sess

    def get(x):
        return inits[x] if x in inits else vals[x]

    mismatched = []
    for n in kernels:
        if n.op_type == "QLinearConv":
            xq, xs, xz, w, ws, _wz, ys, yz = (get(i) for i in n.input[:8])
            bias = get(n.input[8]) if len(n.input) > 8 and n.input[8] else None
            at = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            nd = w.ndim - 2
            pads = at.get("pads", [0] * 2 * nd)
            conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv1d
            acc = conv(torch.from_numpy(xq.astype(np.float64) - float(xz)), torch.from_numpy(w.astype(np.float64)),
                       None, stride=at.get("strides", [1] * nd), padding=tuple(pads[:nd]),
                       dilation=at.get("dilations", [1] * nd), groups=at.get("group", 1))
            view = (1, -1) + (1,) * nd
            if bias is not None:
                acc = acc + torch.from_numpy(bias.astype(np.float64)).view(view)
            mult = (np.float32(xs) * np.asarray(ws, np.float32)).astype(np.float32) / np.float32(ys)
            ref = torch.clamp(torch.round(acc.float() * torch.from_numpy(mult).view(view)) + float(yz), 0, 255).numpy()
            got = get(n.output[0]).astype(np.float32)
            bad = int((ref != got).sum())
        elif n.op_type == "QLinearMatMul":
            aq, as_, az, bq, bs, bz, ys, yz = (get(i) for i in n.input[:8])
            # a, y per tensor; b per tensor (an activation) or per output column (a weight ONNX Runtime fused
            # with the next quantizer: a linear layer feeding a quantized attention matmul)
            as_, az, ys, yz = (np.asarray(v).reshape(-1)[0] for v in (as_, az, ys, yz))
            acc = torch.from_numpy(aq.astype(np.float64) - float(az)) @ torch.from_numpy(
                bq.astype(np.float64) - np.asarray(bz, np.float64).reshape(-1))
            mult = (np.float32(as_) * np.asarray(bs, np.float32).reshape(-1)).astype(np.float32) / np.float32(ys)
            ref = torch.clamp(torch.round(acc.float() * torch.from_numpy(mult.astype(np.float32))) + float(yz),
                              0, 255).numpy()
            got = get(n.output[0]).astype(np.float32)
            bad = int((ref != got).sum())
        else:
            xq, w, xs, ws, xz, wz = (get(i) for i in n.input[:6])
            bias = get(n.input[6]) if len(n.input) > 6 and n.input[6] else None
            acc = torch.from_numpy(xq.astype(np.float64) - float(xz)) @ torch.from_numpy(w.astype(np.float64)
                                                                         - np.asarray(wz, np.float64))
            ref = acc.float() * torch.from_numpy(np.asarray(np.float32(xs) * np.asarray(ws, np.float32), np.float32))
            if bias is not None:
                ref = ref + torch.from_numpy(bias)
            ref = ref.numpy()
            got = get(n.output[0])
            tol = FLOAT_KERNEL_RTOL * (np.abs(ref) + np.abs(ref).mean())
            bad = int((np.abs(ref - got) > tol).sum())
        if bad:
            mismatched.append({"node": n.name, "op": n.op_type, "elements": bad, "of": int(got.size)})
    constant_mismatches = []
    for lq in layers:
        base = node_key(lq.name)
        checks = {f"{base}_x_scale": np.float32(lq.act_in.scale), f"{base}_x_zp": np.uint8(lq.act_in.zero_point)}
        for key, want in checks.items():
            if key in inits and not np.array_equal(inits[key], np.asarray(want, inits[key].dtype)):
                constant_mismatches.append({"constant": key, "engine": inits[key].tolist(),
                                            "calibration": np.asarray(want).tolist()})
    for mq in attention:
        base = node_key(mq.name)
        for side, q in (("a", mq.a), ("b", mq.b)):
            for key, want in ((f"{base}_{side}_scale", np.float32(q.scale)),
                              (f"{base}_{side}_zp", np.uint8(q.zero_point))):
                if key in inits and not np.array_equal(inits[key], np.asarray(want, inits[key].dtype)):
                    constant_mismatches.append({"constant": key, "engine": inits[key].tolist(),
                                                "calibration": np.asarray(want).tolist()})
    return {"kernels": len(kernels), "mismatched": mismatched, "constant_mismatches": constant_mismatches,
            "passed": not mismatched and not constant_mismatches}
