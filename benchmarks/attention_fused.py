"""Attention's core in ONNX Runtime two ways, at UNet attention shapes: the exported graph's Transpose + MatMul +
Softmax + MatMul, and one com.microsoft.MultiHeadAttention node (ORT's fused CPU kernel).

    python benchmarks/attention_fused.py [--threads 2] [--runs 30]

Prints the median ms of each and their max difference, per (batch, tokens, heads, head dim). A measurement for
the ONNX Runtime backend's speed work (docs/speed-and-size.md); ptqd's graphs do not fuse attention yet.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = [(4, 256, 8, 32), (4, 64, 8, 64), (4, 1024, 8, 64), (4, 256, 4, 64)]  # CFG-doubled batch 2


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
    args = ap.parse_args(argv)
    import onnxruntime as ort

    from ptqd.resources import cpu_description

    print(f"CPU: {cpu_description()}; onnxruntime {ort.__version__}, {args.threads} threads")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = args.threads, 3
    print("batch tokens heads dim | decomposed ms | fused ms | fused speed-up | max diff")
    for B, L, H, d in SHAPES:
        feeds = {x: np.random.default_rng(0).standard_normal((B, L, H * d), dtype=np.float32) for x in "qkv"}
        ms, outs = {}, {}
        for name, model in (("decomposed", decomposed(L, H, d)), ("fused", fused(L, H, d))):
            s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for _ in range(5):
                s.run(None, feeds)
            ts = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                outs[name] = s.run(None, feeds)[0]
                ts.append(time.perf_counter() - t0)
            ms[name] = 1000 * float(np.median(ts))
        diff = float(np.abs(outs["fused"] - outs["decomposed"]).max())
        print(f"{B} {L} {H} {d} | {ms['decomposed']:.3f} | {ms['fused']:.3f} | {ms['decomposed'] / ms['fused']:.2f}x "
              f"| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
