"""Attention's core in ONNX Runtime, at UNet attention shapes: the exported graph's Transpose + MatMul +
Softmax + MatMul, one com.microsoft.MultiHeadAttention node (ORT's fused CPU kernel) and, for one head, the bare
``Softmax(q·kᵀ·scale)·v`` on [B, L, C] (what ``graph_opt.fuse_attention`` writes for a single head).

    python benchmarks/attention_fused.py [--threads 2] [--runs 30] [--shapes cin256]
    python benchmarks/attention_fused.py --shapes 1x1024x1x384,2x1024x1x384   (batch x tokens x heads x head dim)

``--shapes cin256`` takes cin256-v2's self-attention shapes (one head; 64x64 latent: 1024, 256 and 64 tokens of
384, 576 and 960 channels) at batch 1 and 2. Prints the median ms of each form and the largest difference to the
decomposed one, per shape. A measurement for the ONNX Runtime backend's speed work (docs/speed-and-size.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = [(4, 256, 8, 32), (4, 64, 8, 64), (4, 1024, 8, 64), (4, 256, 4, 64)]  # CFG-doubled batch 2
CIN256 = [(b, L, 1, C) for L, C in ((1024, 384), (256, 576), (64, 960)) for b in (1, 2)]


def parse_shapes(text: str) -> list[tuple[int, int, int, int]]:
    if text == "cin256":
        return CIN256
    try:
        out = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]
    except ValueError:
        out = []
    if not out or any(len(s) != 4 or min(s) < 1 for s in out):
        raise SystemExit(f"--shapes: expected 'cin256' or BxLxHxD[,BxLxHxD...] (e.g. 1x1024x1x384), got {text!r}")
    return out


def decomposed(L: int, H: int, d: int):
    from onnx import TensorProto as T
    from onnx import helper

    C = H * d
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [helper.make_node("Reshape", [n, "shp"], [n + "r"]),
                  helper.make_node("Transpose", [n + "r"], [n + "t"], perm=[0, 2, 3, 1] if n == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["qt", "kt"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["o"]),
              helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "shp2"], ["out"])]
    inits = [helper.make_tensor("shp", T.INT64, [4], [0, 0, H, d]), helper.make_tensor("shp2", T.INT64, [3], [0, 0, C]),
             helper.make_tensor("scale", T.FLOAT, [], [d ** -0.5])]
    ins = [helper.make_tensor_value_info(x, T.FLOAT, ["B", L, C]) for x in "qkv"]
    g = helper.make_graph(nodes, "att", ins, [helper.make_tensor_value_info("out", T.FLOAT, ["B", L, C])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def bare(L: int, C: int):
    """One head: Softmax(q·kᵀ·scale)·v straight on [B, L, C]."""
    from onnx import TensorProto as T
    from onnx import helper

    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Mul", ["s", "scale"], ["ss"]), helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["out"])]
    ins = [helper.make_tensor_value_info(x, T.FLOAT, ["B", L, C]) for x in "qkv"]
    g = helper.make_graph(nodes, "bare", ins, [helper.make_tensor_value_info("out", T.FLOAT, ["B", L, C])],
                          [helper.make_tensor("scale", T.FLOAT, [], [C ** -0.5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def fused(L: int, H: int, d: int):
    from onnx import TensorProto as T
    from onnx import helper

    C = H * d
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=H)
    ins = [helper.make_tensor_value_info(x, T.FLOAT, ["B", L, C]) for x in "qkv"]
    g = helper.make_graph([node], "mha", ins, [helper.make_tensor_value_info("out", T.FLOAT, ["B", L, C])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--shapes", help="'cin256' or BxLxHxD[,...] (default: SD-like multi-head shapes)")
    args = ap.parse_args(argv)
    shapes = parse_shapes(args.shapes) if args.shapes else SHAPES
    import onnxruntime as ort

    from ptqd.resources import cpu_description

    print(f"CPU: {cpu_description()}; onnxruntime {ort.__version__}, {args.threads} threads")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = args.threads, 3
    print("batch tokens heads dim | decomposed ms | fused ms | bare ms (one head) | fused, bare speed-up | max diff")
    for B, L, H, d in shapes:
        feeds = {x: np.random.default_rng(0).standard_normal((B, L, H * d), dtype=np.float32) for x in "qkv"}
        ms, outs = {}, {}
        forms = [("decomposed", decomposed(L, H, d)), ("fused", fused(L, H, d))] + ([("bare", bare(L, d))] if H == 1 else [])
        for name, model in forms:
            s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for _ in range(5):
                s.run(None, feeds)
            ts = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                outs[name] = s.run(None, feeds)[0]
                ts.append(time.perf_counter() - t0)
            ms[name] = 1000 * float(np.median(ts))
        diff = max(float(np.abs(outs[k] - outs["decomposed"]).max()) for k in outs)
        b_ms = f"{ms['bare']:.3f}" if "bare" in ms else "-"
        b_x = f", {ms['decomposed'] / ms['bare']:.2f}x" if "bare" in ms else ""
        print(f"{B} {L} {H} {d} | {ms['decomposed']:.3f} | {ms['fused']:.3f} | {b_ms} | "
              f"{ms['decomposed'] / ms['fused']:.2f}x{b_x} | {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
