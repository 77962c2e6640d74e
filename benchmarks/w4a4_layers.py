"""W4A4 end to end, layer by layer: is the demo's 4-bit activation error in a few layers or spread over all?

    python benchmarks/w4a4_layers.py demo-out/demo.bundle [--num 64] [--keep 0,2,4,8,12,16,24,32] [--json out.json]

Runs the bundle's fake-quant models in torch (its own calibration, no engine):

1. Sensitivity. For each layer that w4a4 runs with 4-bit activations: ε's squared error when only that layer
   has them and every other layer is at w4a8. It is measured against the all-w4a8 model, on the FP trajectories
   of 8 samples (seed 11, every 4th step).
2. End to end. The top-k most sensitive layers keep 8-bit activations, the rest run w4a4. For each k:
   - paired PSNR vs FP of the decoded images (``--num`` samples, seed 7, 20 DDIM steps, η 0, no correction);
   - BOPs saving against FP32 (the layer table's MACs x bits).

If a handful of layers held most of the error, keeping them at 8-bit activations (as the first and last layers
already are) would be a cheap W4A4. If the error is spread evenly, there is no such shortcut.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--num", type=int, default=64, help="samples for paired PSNR (default 64)")
    ap.add_argument("--keep", default="0,2,4,8,12,16,24,32", help="k values: layers kept at 8-bit activations")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    from ptqd.bundle import Bundle, layout
    from ptqd.calib.bops import bops
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.runtime.loader import default_labels, open_decoder, sampler_config
    from ptqd.runtime.pipeline import decode, guided_eps, sample_latents
    from ptqd.stages.common import calib_layers, load_source
    from ptqd.tools.metrics import psnr

    torch.set_grad_enabled(False)
    b = Bundle.open(args.bundle)
    guidance = b.stage("calibrate")["config"]["guidance"]
    cfg = sampler_config(b.facts, 20, 0.0, guidance)
    loaded, table = load_source(b), layout.class_embedding(b)
    rows = layout.layer_rows(b)
    w4a4 = calib_layers(b, "w4a4")
    w4a8 = {lq.name: lq for lq in calib_layers(b, "w4a8")}
    a4 = [lq.name for lq in w4a4 if lq.a_bits == 4]
    fp_runner = TorchRunner(loaded.unet, "cpu")
    decoder = open_decoder(b)

    def mix(kept: set) -> list:
        return [w4a8[lq.name] if lq.name in kept else lq for lq in w4a4]

    labels = default_labels(b.facts, None, args.num)
    idx = np.arange(args.num) + 1000  # not the calibration's samples
    fp_img = decode(decoder, sample_latents(fp_runner, b.facts, table, labels, idx, 7, cfg), b.facts.scale_factor)

    def score(layers) -> tuple[float, float]:
        lat = sample_latents(TorchRunner(fake_quant_model(loaded.unet, layers), "cpu"), b.facts, table, labels, idx,
                             7, cfg)
        p = float(np.mean(np.minimum(psnr(decode(decoder, lat, b.facts.scale_factor), fp_img), 100.0)))
        bits = {lq.name: (lq.w_bits, lq.a_bits) for lq in layers}
        return p, bops(rows, {}) / bops(rows, bits)

    inputs = []
    sample_latents(fp_runner, b.facts, table, labels[:8], idx[:8], 11, cfg,
                   observe=lambda i, t, x, ctx, eps: inputs.append((t, x.copy(), ctx)) if i % 4 == 0 else None)
    base = TorchRunner(fake_quant_model(loaded.unet, list(w4a8.values())), "cpu")
    ref = [guided_eps(base, x, t, ctx) for t, x, ctx in inputs]
    sens = {}
    for n, name in enumerate(a4):
        r = TorchRunner(fake_quant_model(loaded.unet, mix(set(a4) - {name})), "cpu")
        sens[name] = sum(float(((guided_eps(r, x, t, ctx) - e) ** 2).mean()) for (t, x, ctx), e in zip(inputs, ref))
        print(f"sensitivity {n + 1}/{len(a4)}", file=sys.stderr, end="\r")
    order = sorted(a4, key=lambda k: -sens[k])
    total = sum(sens.values())
    vals = np.array([sens[k] for k in order])
    print(f"{len(a4)} layers with 4-bit activations; eps error when alone at a4: max {vals[0]:.3g}, median "
          f"{np.median(vals):.3g}, min {vals[-1]:.3g}; top 5 hold {vals[:5].sum() / total:.0%}, top 10 "
          f"{vals[:10].sum() / total:.0%} of the sum")
    out = {"bundle": args.bundle, "num": args.num, "layers_a4": len(a4), "sensitivity": dict(zip(order, vals.tolist())),
           "rows": []}
    w48_psnr, w48_bops = score(list(w4a8.values()))
    print(f"{'layers at a8':>12s} {'PSNR vs FP':>10s} {'BOPs saving':>11s}")
    for k in [int(v) for v in args.keep.split(",")]:
        p, saving = score(mix(set(order[:k])))
        out["rows"].append({"kept_a8": k, "psnr_vs_fp": p, "bops_saving": saving})
        print(f"{k:12d} {p:10.2f} {saving:10.1f}x", flush=True)
    out["w4a8"] = {"psnr_vs_fp": w48_psnr, "bops_saving": w48_bops}
    print(f"{'w4a8':>12s} {w48_psnr:10.2f} {w48_bops:10.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
