"""Whole ONNX Runtime engines with and without the attention fusion (``graph_opt.fuse_attention``): one precision
of a calibrated bundle written three times (shape folding in all): every attention core as one MultiHeadAttention
node ("fused attention"), the exported decomposition ("unfused"), and as ``ptqd build`` writes it ("as built":
MultiHeadAttention for several heads, bare matmuls for one, v itself for one key), timed interleaved in one
process.

    python benchmarks/attention_fusion_engine.py BUNDLE [--precision w8a8] [--runs 12] [--work DIR]

``benchmarks/attention_fused.py`` times the attention core alone; this asks whether the fusion pays in the whole
engine, where ONNX Runtime's other rewrites and layouts meet it. Prints the median ms per forward of each at batch
1 and 2, and their largest output difference (an int8 graph's float reordering can flip a later rounding).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="w8a8")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="where the two engines are written (default: a temporary folder)")
    args = ap.parse_args(argv)

    from ptqd.bundle import Bundle, layout
    from ptqd.engines import graph_opt
    from ptqd.engines.onnxruntime import OrtRunner, build_engine
    from ptqd.engines.qdq import write_qdq
    from ptqd.engines.runner import round_robin
    from ptqd.resources import cpu_description
    from ptqd.stages.common import calib_layers

    b = Bundle.open(args.bundle)
    fp = b.path(layout.UNET_ONNX)
    layers = calib_layers(b, args.precision, 0, 1)
    graph_opt.prepare(fp)
    values, _ = graph_opt.evaluated(fp)
    _, shapes = graph_opt.evaluated(fp)

    def mha_everywhere(m):
        graph_opt.fold_shapes(m, values)
        graph_opt.fuse_attention(m, shapes, fuse_all=True)

    variants = {"fused attention": mha_everywhere, "unfused": lambda m: graph_opt.fold_shapes(m, values),
                "as built": lambda m: graph_opt.optimize_for_ort(m, fp)}
    work = Path(args.work or tempfile.mkdtemp(prefix="attn-engine-"))
    work.mkdir(parents=True, exist_ok=True)
    engines = {}
    for i, (name, rewrite) in enumerate(variants.items()):
        qdq, eng = work / f"{args.precision}.{i}.qdq.onnx", work / f"{args.precision}.{i}.onnx"
        write_qdq(fp, layers, qdq, rewrite=rewrite, low_bits_clip="int")  # as ptqd build writes them
        build_engine(qdq, eng)
        engines[name] = eng
    facts = b.facts
    print(f"{b.root} {args.precision}, {args.threads} threads, median of {args.runs}; {cpu_description()}")
    for batch in (1, 2):
        rs = np.random.RandomState(batch)
        x = rs.standard_normal((batch, *facts.latent_shape)).astype(np.float32)
        t = np.full(batch, 500.0, np.float32)
        ctx = None
        if facts.conditioning.kind != "none":
            emb = layout.class_embedding(b)
            ctx = emb[np.arange(batch) % len(emb)].astype(np.float32)
            ctx = ctx[:, None] if ctx.ndim == 2 else ctx
        runners = {k: OrtRunner(v, args.threads) for k, v in engines.items()}
        outs = [r.infer(x, t, ctx) for r in runners.values()]
        times = round_robin({k: (lambda r=r: r.infer(x, t, ctx)) for k, r in runners.items()}, runs=args.runs)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
              + f"; unfused / fused {med['unfused'] / med['fused attention']:.3f}, as built / fused "
              f"{med['as built'] / med['fused attention']:.3f}; max |difference| to fused "
              f"{max(float(np.abs(o - outs[0]).max()) for o in outs[1:]):.2e}")
        for r in runners.values():
            r.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
