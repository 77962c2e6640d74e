"""W4A4 without training, layer by layer: how much of each 4-bit layer's output error smoothing (SmoothQuant's α)
and a low-rank float branch (SVDQuant's W = L1·L2 + R) remove, on recorded inputs of real trajectories.

    python benchmarks/w4a4_outliers.py demo-out/demo.bundle [--samples 8 --rank-budget 0.05] [--grids] [--json out.json]

For every layer the bundle's w4a4 quantizes with 4-bit activations, on its inputs along FP trajectories (the
calibration's sampler settings, seeds 500+ so not the calibration's), the relative output error
‖ŷ − y‖² / ‖y‖² of:

  ptqd        the bundle's calibrated layer (its activation range, its GPTQ weights)
  rtn         4-bit activations (MSE-searched per-tensor range), RTN 4-bit weights (MSE-searched per channel)
  smooth      rtn after migrating activation range into the weights per input channel, s_c = a_c^α / w_c^(1−α),
              α searched over {0.25, 0.5, 0.75} per layer
  lowrank     rtn of R = W − L, L the top-r SVD of W kept in float and fed the unquantized input; r the largest
              rank whose branch stays within --rank-budget of the layer's MACs
  both        smoothing, then the low-rank split of the smoothed weight
  rotate      rtn after rotating the input channels (QuaRot's idea): x' = Qᵀx per pixel/token, W' = W·Q, Q a
              random orthogonal matrix (seeded; dense, so an engine would run it as an online C x C matmul)
  hadamard    the same with Q block-diagonal: randomly signed Hadamard blocks of the largest power of two
              dividing C (cheap online: a fast Walsh-Hadamard transform per block)
  a4_only     4-bit activations, float weights; w4_only: RTN 4-bit weights, float activations (the split of rtn)
  group16/32  rtn with one activation range per group of 16 / 32 input channels (finer activation groups; needs
              a kernel that sums one integer product per group)
  fp4 / ufp4  rtn weights with 16 activation levels that are not evenly spaced (``--grids``): o + s·L with L the
              integers {-12 -8 -6 -4 -3 -2 -1 0 1 2 3 4 6 8 12 16} (an E2M1-like float code, doubled) or
              {0 1 2 3 4 6 8 12 16 24 32 48 64 96 128 192} (an unsigned E3M1-like code), s and the offset o
              (a whole number of s) searched for the least MSE. The levels are points of one grid of step s that
              contains 0; where its span fits 256 steps (always for fp4), an 8-bit integer kernel computes such a
              layer exactly and only the rounding to the 16 levels is new.
  lloyd       rtn weights with the 16 activation levels of least MSE on the layer's own input samples (Lloyd-Max,
              1-D k-means): no 16-level code, however its levels are spaced, quantizes these inputs with less
              squared error, so it bounds what any per-tensor 4-bit activation code could buy (no kernel runs it).
              ``*_a_only``: the same activations with float weights (compare a4_only).
  dyn_*       rtn weights with activation ranges taken at run time from each input (``--dynamic``), as
              DynamicQuantizeLinear and SVDQuant's kernels do: ``dyn_call`` one range per call (all of x),
              ``dyn_token`` one per pixel/token (all its channels), ``dyn_token_g64`` / ``_g16`` one per
              pixel/token and group of 64 / 16 channels (SVDQuant's INT4 grouping is 64). Each range is the
              group's min/max (0 kept inside) shrunk by a factor searched per layer in {1, 0.9, 0.8, 0.7, 0.6}.
              ``dyn_token_g16s``: the same groups, symmetric signed levels −8..7 times amax/7, no zero point.
              ``*_a_only``: the same with float weights.

A layer-level study (no engine, no end-to-end sample): it says which of issue 24's two mechanisms pays on this
model, and where, before the graph work.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

ALPHAS = (0.25, 0.5, 0.75)


def record_inputs(loaded, modules: dict, facts, table, cfg, samples: int, seed: int):
    """{layer name: [input tensors]} along FP trajectories of ``samples`` classes."""
    import torch

    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.runtime.loader import default_labels
    from ptqd.runtime.pipeline import sample_latents

    got = {name: [] for name in modules}
    hooks = [mod.register_forward_pre_hook(lambda _m, a, n=name: got[n].append(a[0].detach().clone()))
             for name, mod in modules.items()]
    try:
        labels = default_labels(facts, None, samples)
        with torch.no_grad():
            sample_latents(TorchRunner(loaded.unet, "cpu"), facts, table, labels, np.arange(samples), seed, cfg)
    finally:
        for h in hooks:
            h.remove()
    return got


def act_quant(xs, bits: int = 4):
    from ptqd.calib.quant import choose_act_range

    flat = np.concatenate([x.reshape(-1).numpy() for x in xs])
    pick = flat[np.random.RandomState(0).randint(0, flat.size, min(flat.size, 200_000))]
    return choose_act_range(pick, float(flat.min()), float(flat.max()), bits, "mse")


def rtn(w, bits: int = 4):
    import torch

    from ptqd.calib.quant import quantize_weight, weight_scales

    s = weight_scales(w.numpy(), bits, 0, "mse")
    q = quantize_weight(w.numpy(), s, bits, 0)
    return torch.from_numpy(q.astype(np.float32) * s.reshape([-1] + [1] * (w.dim() - 1)))


def apply(mod, x, w):
    import torch.nn.functional as F

    if w.dim() == 2:
        return F.linear(x, w)
    return F.conv2d(x, w, None, mod.stride, mod.padding, mod.dilation, mod.groups)


def dequantized_weight(lq):
    """A calibrated layer's 4-bit weights as float: its integers times their per-channel scales."""
    import torch

    return torch.from_numpy(lq.w_int.astype(np.float32) * lq.w_scale.reshape([-1] + [1] * (lq.w_int.ndim - 1)))


def rel_err(mod, xs, w_ref, run) -> float:
    num = den = 0.0
    for x in xs:
        y = apply(mod, x, w_ref)
        num += float(((run(x) - y) ** 2).sum())
        den += float((y ** 2).sum())
    return num / max(den, 1e-30)


def channel_absmax(xs, dim: int):
    import torch

    axes = [d for d in range(xs[0].dim()) if d != dim]
    return torch.stack([x.abs().amax(dim=axes) for x in xs]).amax(0)


def split_lowrank(w, rank: int):
    import torch

    w2 = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(w2, full_matrices=False)
    low = ((u[:, :rank] * s[:rank]) @ vh[:rank]).float().reshape(w.shape)
    return low, w - low


def rotation(c: int, kind: str, seed: int = 0):
    """An orthogonal c x c matrix: "dense" random (QR of a Gaussian), or "hadamard" block-diagonal randomly signed
    Hadamard blocks of the largest power of two dividing c."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind == "dense":
        q, r = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()
    n = c & -c  # largest power of two dividing c
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / np.sqrt(n)
    signs = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    return (torch.block_diag(*[h] * (c // n)) * signs[:, None]).float()


def move_channels(x, cdim: int, q):
    """x with its channel axis ``cdim`` multiplied by q (x' = Qᵀx per position)."""
    return (x.movedim(cdim, -1) @ q).movedim(-1, cdim)


def group_act_quant(xs, cdim: int, size: int):
    """One 4-bit activation range (MSE-searched) per group of ``size`` channels: a fake-quant function."""
    import torch

    from ptqd.calib.fakequant import fake_quant

    c = xs[0].shape[cdim]
    groups = [(i, min(c, i + size)) for i in range(0, c, size)]
    qs = [act_quant([x.narrow(cdim, a, b - a) for x in xs]) for a, b in groups]
    return lambda x: torch.cat([fake_quant(x.narrow(cdim, a, b - a), q) for (a, b), q in zip(groups, qs)], cdim)


LEVELS = {"fp4": np.array([-12, -8, -6, -4, -3, -2, -1, 0, 1, 2, 3, 4, 6, 8, 12, 16], np.float64),
          "ufp4": np.array([0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192], np.float64)}


def snap(x, levels):
    """Each value of ``x`` (numpy) replaced by its nearest entry of the sorted ``levels`` (ties: the lower)."""
    return levels[np.searchsorted((levels[1:] + levels[:-1]) / 2, x)]


def nearest_level(levels):
    """``snap`` for torch tensors: a fake-quant function onto the sorted ``levels``."""
    import torch

    lv = torch.from_numpy(np.asarray(levels, np.float32))
    edges = (lv[1:] + lv[:-1]) / 2
    return lambda x: lv[torch.bucketize(x, edges)]


def grid_act_quant(xs, levels):
    """The activation levels ``o + s·L`` (o a whole number of s) with the least MSE on the inputs' samples:
    a fake-quant function. s on a geometric grid around (max − min) / span(L), o/s from where L's densest part
    lands on the lowest sample to where it lands on the sample median."""

    flat = np.concatenate([x.reshape(-1).numpy() for x in xs]).astype(np.float64)
    pick = flat[np.random.RandomState(0).randint(0, flat.size, min(flat.size, 50_000))]
    lo, hi, med = float(flat.min()), float(flat.max()), float(np.median(pick))
    dense = float(levels[np.argmin(np.abs(levels))])  # where the code's levels are densest (its 0)
    best = (np.inf, 1.0, 0.0)
    for s in (hi - lo) / (levels[-1] - levels[0]) * np.geomspace(0.15, 1.2, 24):
        for anchor in np.linspace(lo, med, 12):
            o = round((anchor - dense * s) / s) * s
            err = float(np.mean((snap((pick - o) / s, levels) * s + o - pick) ** 2))
            if err < best[0]:
                best = (err, s, o)
    _, s, o = best
    return nearest_level(levels * s + o)


def lloyd_act_quant(xs, k: int = 16, iters: int = 60):
    """The ``k`` levels of least squared error on the inputs' samples (Lloyd-Max: alternate nearest-level
    assignment and cell means, from the samples' quantiles): a fake-quant function."""

    flat = np.concatenate([x.reshape(-1).numpy() for x in xs]).astype(np.float64)
    pick = np.sort(flat[np.random.RandomState(0).randint(0, flat.size, min(flat.size, 200_000))])
    levels = np.quantile(pick, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        cell = np.searchsorted((levels[1:] + levels[:-1]) / 2, pick)
        sums, counts = np.bincount(cell, pick, k), np.bincount(cell, minlength=k)
        levels = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), levels))
    return nearest_level(levels)


def dynamic_act_quant(cdim: int, group: int | None, shrink: float, per_call: bool = False, bits: int = 4,
                      symmetric: bool = False):
    """A fake-quant function whose asymmetric range comes from the tensor it quantizes: one range per call
    (``per_call``), else one per position and group of ``group`` channels (None: all channels). ``symmetric``:
    signed levels −2^(bits−1)..2^(bits−1)−1 times amax / (2^(bits−1)−1), no zero point."""
    import torch

    top = 2 ** bits - 1

    def run(x):
        if per_call:
            lo, hi = x.amin().clamp_max(0), x.amax().clamp_min(0)
        else:
            xm = x.movedim(cdim, -1)
            g = xm.shape[-1] if group is None else group
            xm = xm.reshape(*xm.shape[:-1], xm.shape[-1] // g, g)
            lo, hi = xm.amin(-1, keepdim=True).clamp_max(0), xm.amax(-1, keepdim=True).clamp_min(0)
        lo, hi = lo * shrink, hi * shrink
        src = x if per_call else xm
        if symmetric:
            half = 2 ** (bits - 1)
            s = (torch.maximum(-lo, hi) / (half - 1)).clamp_min(1e-12)
            q = torch.clamp(torch.round(src / s), -half, half - 1) * s
        else:
            s = ((hi - lo) / top).clamp_min(1e-12)
            z = torch.round(-lo / s)
            q = (torch.clamp(torch.round(src / s) + z, 0, top) - z) * s
        if per_call:
            return q
        return q.reshape(*q.shape[:-2], -1).movedim(-1, cdim)

    return run


def study_dynamic(mod, xs, out: dict, cdim: int, w, w_rtn) -> None:
    """The ``dyn_*`` rows into ``out``: run-time ranges, shrink searched per layer on the rtn-weight error."""
    c = xs[0].shape[cdim]
    for key, group, per_call, symmetric in (("dyn_call", None, True, False), ("dyn_token", None, False, False),
                                            ("dyn_token_g64", 64, False, False), ("dyn_token_g16", 16, False, False),
                                            ("dyn_token_g16s", 16, False, True)):
        if group is not None and c % group:
            out[key] = out[f"{key}_a_only"] = None
            continue
        best = None
        for shrink in (1.0, 0.9, 0.8, 0.7, 0.6):
            dq = dynamic_act_quant(cdim, group, shrink, per_call, symmetric=symmetric)
            err = rel_err(mod, xs, w, lambda x, dq=dq: apply(mod, dq(x), w_rtn))
            if best is None or err < best[0]:
                best = (err, shrink, dq)
        out[key], out[f"{key}_shrink"] = best[0], best[1]
        out[f"{key}_a_only"] = rel_err(mod, xs, w, lambda x, dq=best[2]: apply(mod, dq(x), w))


def study_layer(mod, xs, lq, rank_budget: float, grids_only: bool = False, dynamic: bool = False) -> dict:

    from ptqd.calib.fakequant import fake_quant

    w = mod.weight.detach().float()
    cdim = 1 if w.dim() == 4 else xs[0].dim() - 1  # input channel axis of x
    out: dict = {}
    wq = dequantized_weight(lq)
    out["ptqd"] = rel_err(mod, xs, w, lambda x: apply(mod, fake_quant(x, lq.act_in), wq))
    aq = act_quant(xs)
    w_rtn = rtn(w)
    out["rtn"] = rel_err(mod, xs, w, lambda x: apply(mod, fake_quant(x, aq), w_rtn))
    out["a4_only"] = rel_err(mod, xs, w, lambda x: apply(mod, fake_quant(x, aq), w))
    out["w4_only"] = rel_err(mod, xs, w, lambda x: apply(mod, x, w_rtn))
    if dynamic:
        study_dynamic(mod, xs, out, cdim, w, w_rtn)
        return out
    for name, levels in LEVELS.items():
        gq = grid_act_quant(xs, levels)
        out[name] = rel_err(mod, xs, w, lambda x, gq=gq: apply(mod, gq(x), w_rtn))
        out[f"{name}_a_only"] = rel_err(mod, xs, w, lambda x, gq=gq: apply(mod, gq(x), w))
    lq16 = lloyd_act_quant(xs)
    out["lloyd"] = rel_err(mod, xs, w, lambda x: apply(mod, lq16(x), w_rtn))
    out["lloyd_a_only"] = rel_err(mod, xs, w, lambda x: apply(mod, lq16(x), w))
    if grids_only:
        return out
    a_max = channel_absmax(xs, cdim).clamp_min(1e-5)
    w_max = w.abs().amax(dim=[d for d in range(w.dim()) if d != 1]).clamp_min(1e-5)
    shape_x = [1] * xs[0].dim()
    shape_x[cdim] = -1
    shape_w = [1] * w.dim()
    shape_w[1] = -1

    def smoothed(alpha):
        s = (a_max ** alpha / w_max ** (1 - alpha)).clamp_min(1e-5)
        xs_s = [x / s.reshape(shape_x) for x in xs]
        return s, xs_s, w * s.reshape(shape_w)

    best = None
    for alpha in ALPHAS:
        s, xs_s, w_s = smoothed(alpha)
        aq_s, wq_s = act_quant(xs_s), rtn(w_s)
        err = rel_err(mod, xs, w, lambda x, s=s, aq_s=aq_s, wq_s=wq_s: apply(mod, fake_quant(x / s.reshape(shape_x),
                                                                                              aq_s), wq_s))
        if best is None or err < best[1]:
            best = (alpha, err)
    out["smooth"], out["alpha"] = best[1], best[0]
    if w.dim() == 2 or mod.groups == 1:
        for kind, key in (("dense", "rotate"), ("hadamard", "hadamard")):
            q = rotation(w.shape[1], kind)
            xs_r = [move_channels(x, cdim, q) for x in xs]
            w_r = rtn(move_channels(w, 1, q))
            aq_r = act_quant(xs_r)
            out[key] = rel_err(mod, xs, w, lambda x, q=q, aq_r=aq_r, w_r=w_r: apply(
                mod, fake_quant(move_channels(x, cdim, q), aq_r), w_r))
    for size in (16, 32):
        gq = group_act_quant(xs, cdim, size)
        out[f"group{size}"] = rel_err(mod, xs, w, lambda x, gq=gq: apply(mod, gq(x), w_rtn))
    k = int(np.prod(w.shape[1:]))
    rank = int(rank_budget * w.shape[0] * k // (k + w.shape[0]))  # branch MACs r·(k + C_out) <= budget · C_out·k
    out["rank"] = rank
    if rank < 1:
        out["lowrank"] = out["both"] = None
        return out
    low, res = split_lowrank(w, rank)
    res_q = rtn(res)
    out["lowrank"] = rel_err(mod, xs, w, lambda x: apply(mod, x, low) + apply(mod, fake_quant(x, aq), res_q))
    s, xs_s, w_s = smoothed(out["alpha"])
    low_s, res_s = split_lowrank(w_s, rank)
    aq_s, res_sq = act_quant(xs_s), rtn(res_s)
    out["both"] = rel_err(mod, xs, w, lambda x: apply(mod, x / s.reshape(shape_x), low_s)
                          + apply(mod, fake_quant(x / s.reshape(shape_x), aq_s), res_sq))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rank-budget", type=float, default=0.05, help="branch MACs / layer MACs (default 0.05)")
    ap.add_argument("--grids", action="store_true",
                    help="only the rows ptqd, rtn, a4_only, w4_only and the non-uniform grids (fp4, ufp4, lloyd)")
    ap.add_argument("--dynamic", action="store_true",
                    help="only the rows ptqd, rtn, a4_only, w4_only and the run-time activation ranges (dyn_*)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch

    from ptqd.bundle import Bundle, layout
    from ptqd.runtime.loader import sampler_config
    from ptqd.stages.common import calib_layers, load_source

    torch.set_grad_enabled(False)
    b = Bundle.open(args.bundle)
    c = b.stage("calibrate")["config"]
    cfg = sampler_config(b.facts, c["steps"], c["eta"], c["guidance"])
    loaded = load_source(b)
    layers = [lq for lq in calib_layers(b, "w4a4") if lq.a_bits == 4 and lq.w_bits == 4]
    unet = loaded.unet.unet
    modules = {lq.name: unet.get_submodule(lq.module) for lq in layers}
    xs = record_inputs(loaded, modules, b.facts, layout.class_embedding(b), cfg, args.samples, seed=500)
    rows = []
    for lq in layers:
        r = study_layer(modules[lq.name], xs[lq.name], lq, args.rank_budget, args.grids, args.dynamic)
        rows.append({"layer": lq.name, **r})
        if args.dynamic:
            print(f"{lq.name[:48]:48s} ptqd {r['ptqd']:.4f} rtn {r['rtn']:.4f} a4 {r['a4_only']:.4f} "
                  + " ".join(f"{k[4:]} {'-' if r[k] is None else round(r[k], 4)}" for k in DYNAMIC),
                  file=sys.stderr)
            continue
        if args.grids:
            print(f"{lq.name[:48]:48s} ptqd {r['ptqd']:.4f} rtn {r['rtn']:.4f} a4 {r['a4_only']:.4f} "
                  f"fp4 {r['fp4']:.4f} ({r['fp4_a_only']:.4f}) ufp4 {r['ufp4']:.4f} ({r['ufp4_a_only']:.4f}) "
                  f"lloyd {r['lloyd']:.4f} ({r['lloyd_a_only']:.4f})",
                  file=sys.stderr)
            continue
        print(f"{lq.name[:48]:48s} ptqd {r['ptqd']:.4f} rtn {r['rtn']:.4f} smooth {r['smooth']:.4f} "
              f"(a {r['alpha']}) lowrank {r['lowrank'] if r['lowrank'] is None else round(r['lowrank'], 4)} "
              f"both {r['both'] if r['both'] is None else round(r['both'], 4)} r {r['rank']} "
              f"rot {r.get('rotate', float('nan')):.4f} had {r.get('hadamard', float('nan')):.4f} "
              f"g16 {r['group16']:.4f} g32 {r['group32']:.4f}", file=sys.stderr)
    if args.dynamic:
        summary = dynamic_summary(rows)
    else:
        summary = grid_summary(rows, args.grids)
    out = {"bundle": args.bundle, "layers": len(rows), "samples": args.samples, "rank_budget": args.rank_budget,
           "summary": summary, "rows": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


DYNAMIC = ("dyn_call", "dyn_token", "dyn_token_g64", "dyn_token_g16", "dyn_token_g16s")


def dynamic_summary(rows) -> dict:
    """Mean / median error of each row; for dyn_* over the layers where it applies, beside rtn (a4_only) there."""
    summary = {key: {"mean_rel_err": float(np.mean([r[key] for r in rows])),
                     "median_rel_err": float(np.median([r[key] for r in rows]))}
               for key in ("a4_only", "w4_only", "ptqd", "rtn")}
    for key in DYNAMIC:
        for own, ref in ((key, "rtn"), (f"{key}_a_only", "a4_only")):
            some = [r for r in rows if r[own] is not None]
            summary[own] = {"layers": len(some), "mean_rel_err": float(np.mean([r[own] for r in some])),
                            f"mean_{ref}_same_layers": float(np.mean([r[ref] for r in some])),
                            f"layers_better_than_{ref}": sum(1 for r in some if r[own] < r[ref])}
    return summary


def grid_summary(rows, grids_only: bool) -> dict:
    summary = {}
    grids = ("fp4", "ufp4", "lloyd", "fp4_a_only", "ufp4_a_only", "lloyd_a_only")
    keys = ("a4_only", "w4_only", "ptqd", "rtn") + grids + (
        () if grids_only else ("smooth", "lowrank", "both", "rotate", "hadamard", "group16", "group32"))
    for key in keys:
        vals = [r[key] if r.get(key) is not None else r["rtn"] for r in rows]
        summary[key] = {"mean_rel_err": float(np.mean(vals)), "median_rel_err": float(np.median(vals))}
    for key in ("fp4", "ufp4", "lloyd") + keys[10:]:
        summary[key]["layers_better_than_rtn"] = sum(
            1 for r in rows if r.get(key) is not None and r[key] < r["rtn"])
    for key in ("fp4_a_only", "ufp4_a_only", "lloyd_a_only"):
        summary[key]["layers_better_than_a4_only"] = sum(1 for r in rows if r[key] < r["a4_only"])
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
