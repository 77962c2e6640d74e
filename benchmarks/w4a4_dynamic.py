"""W4A4 end to end with activation ranges taken at run time: does a range per pixel/token, or per small group of
its channels, make 4-bit activations hold on the demo?

    python benchmarks/w4a4_dynamic.py demo-out/demo.bundle [--num 500] [--eta 0] [--plan]
        [--modes static,token,token_fc,g64,g32,g16,g8,g16_fc,nvfp4,nvfp4_w,mxfp4,mxfp4_w] [--json out.json]

Runs the bundle's w4a4 as torch fake-quant models (its own calibration and GPTQ weights, no engine, no PTQD
correction) and scores them as ``ptqd eval`` does: paired PSNR vs FP, FD vs FP and class accuracy on the
demo's classifier, ``--num`` samples from seed 0, 20 DDIM steps. The rows ``exact w4a4`` and ``exact w4a8`` are
the bundle's exact fake-quant models (what the engines compute, without correction). In every other row each
layer with 4-bit activations runs ``y = op(a(x), W) + b`` in float (a conv's output then on its 8-bit grid),
W the bundle's 4-bit weights unless the mode says otherwise, with ``a``:

  static    the calibrated per-tensor range (what the engines run; checks this float path against the exact one)
  token     asymmetric 4-bit, min/max per pixel (conv) or token (linear) over all its channels
  token_fc  ``token`` on linears and 1x1 convs only, where a per-row scale factors out of the integer product
            (s_row · Σ q_x·q_w: an integer matmul and one Mul); k×k convs keep the static range
  g64 g32 g16 g8   asymmetric 4-bit, min/max per pixel/token and group of that many channels (SVDQuant's INT4
            grouping is 64); a kernel sums one integer product per group, times its scale
  g32_fc g16_fc    the same on linears and 1x1 convs only
  g64s g16s symmetric signed 4-bit (−8..7 times amax/7, no zero point) per pixel/token and group of 64 / 16
            channels: SVDQuant's INT4 grouping, and what an INT4 block-scaled GEMM without zero points runs
  nvfp4     NVIDIA's NVFP4 activations: E2M1 values (±0, 0.5, 1, 1.5, 2, 3, 4, 6), one scale per 16 channels of a
            pixel/token, amax/6 rounded to FP8 E4M3 under a per-call FP32 scale
  mxfp4     OCP MXFP4 activations: E2M1 values, one power-of-two scale per 32 channels, 2^(floor(log2 amax) − 2)
  nvfp4_w / mxfp4_w   the same format for the weights too (blocks along the input channels, round to nearest):
            the format end to end, as a Blackwell GPU's FP4 tensor cores run it

``--plan`` adds a ``plan:`` row per mode (and ``plan:exact``): the bundle's step-aware plan (``ptqd plan``), its
w4a8 steps on the exact w4a8 model and its w4a4 steps on that mode's model, no correction. Each mode prints how
many of the 4-bit-activation layers it covers: a layer whose channels its group does not divide (or, for the
``_fc`` modes, a k×k conv) keeps the calibrated range.

Layers with 8-bit activations are the bundle's exact fake-quant layers in every row, and the first and last
layers stay as the bundle has them. The rows say how much of issue 24's gap a run-time range closes, and in
which format, before any engine is built for it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).parent))
from w4a4_outliers import dequantized_weight, dynamic_act_quant  # noqa: E402

MODES = {"static": (None, False), "token": (0, False), "token_fc": (0, True), "g64": (64, False),
         "g32": (32, False), "g16": (16, False), "g8": (8, False), "g32_fc": (32, True),
         "g16_fc": (16, True), "nvfp4": ("nvfp4", False), "mxfp4": ("mxfp4", False),
         "nvfp4_w": ("nvfp4", False), "mxfp4_w": ("mxfp4", False), "g64s": (64, False),
         "g16s": (16, False)}  # (group: 0 = all channels | format, fc-only)
FP4 = {"nvfp4": 16, "mxfp4": 32}  # block sizes
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1(v):
    """``v`` (already divided by its scale) to the nearest E2M1 value, ties to the even mantissa (0, 1, 2, 4);
    saturates at ±6."""
    import torch

    lv = torch.tensor(E2M1, dtype=v.dtype, device=v.device)
    mids = (lv[1:] + lv[:-1]) / 2
    a = v.abs().contiguous()
    idx = torch.bucketize(a, mids)  # a tie lands on the lower level
    tie = (idx < len(mids)) & (a == mids[idx.clamp(max=len(mids) - 1)])
    idx = torch.where(tie & (idx % 2 == 1), idx + 1, idx)  # even indices are the even mantissas
    return torch.sign(v) * lv[idx]


def e4m3(v):
    """``v`` ≥ 0 rounded to FP8 E4M3 (torch's float8_e4m3fn cast: nearest, ties to even, subnormals down to
    2^-9, 0 kept), saturating at 448."""
    import torch

    return v.clamp(max=448.0).to(torch.float8_e4m3fn).to(v.dtype)


def fp4_blocks(x, cdim: int, fmt: str):
    """``x`` fake-quantized to ``fmt`` (nvfp4 | mxfp4) in blocks along axis ``cdim``."""
    import torch

    size = FP4[fmt]
    xm = x.movedim(cdim, -1)
    xb = xm.reshape(*xm.shape[:-1], xm.shape[-1] // size, size)
    amax = xb.abs().amax(-1, keepdim=True)
    if fmt == "nvfp4":
        g = (x.abs().amax() / (6.0 * 448.0)).clamp_min(1e-30)  # per-call FP32 scale so block scales fit E4M3
        s = e4m3((amax / 6.0) / g) * g
    else:
        s = torch.pow(2.0, torch.floor(torch.log2(amax.clamp_min(1e-30))) - 2)
    q = torch.where(s > 0, e2m1(xb / torch.where(s > 0, s, 1.0)) * s, 0.0)  # a block whose scale is 0 is 0
    return q.reshape(xm.shape).movedim(-1, cdim)


def float_twin(src, lq, quant, weight_fmt: str | None = None):
    """The layer as ``op(quant(x), dequantized weights) + bias`` (weights: the bundle's integers, or the float
    weights in ``weight_fmt``); a conv's output on its 8-bit grid."""
    import torch.nn.functional as F
    from torch import nn

    from ptqd.calib.fakequant import fake_quant

    w = dequantized_weight(lq) if weight_fmt is None else fp4_blocks(src.weight.detach().float(), 1, weight_fmt)
    bias = None if src.bias is None else src.bias.detach().clone()
    linear = isinstance(src, nn.Linear)

    class Twin(nn.Module):
        def forward(self, x):
            xq = quant(x)
            if linear:
                return F.linear(xq, w, bias)
            f = F.conv1d if isinstance(src, nn.Conv1d) else F.conv2d
            y = f(xq, w, bias, src.stride, src.padding, src.dilation, src.groups)
            return y if lq.act_out is None else fake_quant(y, lq.act_out)

    return Twin()


def is_fc(mod) -> bool:
    from torch import nn

    return isinstance(mod, nn.Linear) or all(k == 1 for k in mod.kernel_size)


def mode_model(loaded, layers, mode: str, shrink: float):
    """(the exact fake-quant model with every 4-bit-activation layer replaced by its float twin under ``mode``,
    how many of those layers got the mode's ranges: the others, whose channels the group does not divide or,
    for ``_fc`` modes, k×k convs, keep the calibrated range)."""
    from torch import nn

    from ptqd.calib.fakequant import fake_quant, fake_quant_model

    model = fake_quant_model(loaded.unet, layers)
    group, fc_only = MODES[mode]
    covered = 0
    for lq in layers:
        if lq.a_bits != 4:
            continue
        src = loaded.unet.unet.get_submodule(lq.module)
        cdim = -1 if isinstance(src, nn.Linear) else 1
        c = src.weight.shape[1] * (src.groups if not isinstance(src, nn.Linear) else 1)
        size = FP4.get(group, group)
        weight_fmt = group if mode.endswith("_w") else None
        if group is None or (fc_only and not is_fc(src)) or (size and c % size) or (
                weight_fmt and src.weight.shape[1] % size):
            quant, weight_fmt = (lambda q: lambda x: fake_quant(x, q))(lq.act_in), None
        else:
            if group in FP4:
                quant = (lambda cd, fmt: lambda x: fp4_blocks(x, cd, fmt))(cdim, group)
            else:
                quant = dynamic_act_quant(cdim, group or None, shrink, symmetric=mode in ("g64s", "g16s"))
            covered += 1
        model.unet.set_submodule(lq.module, float_twin(src, lq, quant, weight_fmt))
    return model, covered


def w4a4_plan(b, cfg):
    """The bundle's step plan, checked for what ``--plan`` rows need (w4a8 and w4a4 steps only, on this run's DDIM
    timesteps; ValueError naming what is wrong otherwise); prints how many steps are w4a4."""
    from ptqd.bundle import layout
    from ptqd.runtime.correction import Plan
    from ptqd.runtime.pipeline import scheduler_for

    plan = Plan.from_json(json.loads(b.path(layout.PLAN_JSON).read_text())) if b.has(layout.PLAN_JSON) else None
    if plan is None or set(plan.precision) - {"w4a8", "w4a4"}:
        raise ValueError("--plan: the bundle needs a plan of w4a8 and w4a4 steps (ptqd plan BUNDLE --budget 0.79)")
    sampled = [float(t) for t in scheduler_for(b.facts, cfg).timesteps]
    if sorted(map(float, plan.t)) != sorted(sampled):
        raise ValueError(f"--plan: the plan's timesteps {plan.t} are not this run's DDIM steps {sampled}")
    print(f"plan: w4a4 on {plan.precision.count('w4a4')} of {len(plan.t)} steps", flush=True)
    return plan


def print_rows(rows, width: int) -> None:
    """``evaluate_runners``' rows as a table: PSNR vs FP, FD vs FP, class accuracy."""
    print(f"{'row':{width}s} {'PSNR vs FP':>10s} {'FD vs FP':>9s} {'class acc':>9s}")
    for r in rows:
        acc = r.get("class_acc")
        print(f"{r['precision']:{width}s} {r.get('psnr_vs_fp') or float('nan'):10.2f} "
              f"{r.get('fd_vs_fp') or float('nan'):9.2f} {'-' if acc is None else f'{acc:.1%}':>9s}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--num", type=int, default=500, help="samples (default 500, as ptqd eval)")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM η (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0, as ptqd eval)")
    ap.add_argument("--modes", default="static,token,token_fc,g64,g32,g16,g8,g16_fc,nvfp4,nvfp4_w,mxfp4,mxfp4_w",
                    help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--shrink", type=float, default=1.0, help="INT4 run-time ranges times this factor (default 1)")
    ap.add_argument("--plan", action="store_true", help="also the bundle's plan with its w4a4 steps in each mode")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    import torch

    from ptqd.bundle import Bundle, layout
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.runtime.correction import StepEngines
    from ptqd.runtime.loader import default_labels, open_decoder, sampler_config
    from ptqd.stages.common import calib_layers, load_source
    from ptqd.tools.metrics import FeatureModel, evaluate_runners

    torch.set_grad_enabled(False)
    b = Bundle.open(args.bundle)
    cfg = sampler_config(b.facts, 20, args.eta, b.stage("calibrate")["config"]["guidance"])
    loaded = load_source(b)
    w4a4 = calib_layers(b, "w4a4")
    runners = {"fp32": TorchRunner(loaded.unet, "cpu"),
               "exact w4a8": TorchRunner(fake_quant_model(loaded.unet, calib_layers(b, "w4a8")), "cpu"),
               "exact w4a4": TorchRunner(fake_quant_model(loaded.unet, w4a4), "cpu")}
    a4 = sum(lq.a_bits == 4 for lq in w4a4)
    for mode in modes:
        model, covered = mode_model(loaded, w4a4, mode, args.shrink)
        runners[mode] = TorchRunner(model, "cpu")
        print(f"{mode}: run-time ranges on {covered} of the {a4} layers with 4-bit activations", flush=True)
    if args.plan:
        try:
            plan = w4a4_plan(b, cfg)
        except ValueError as e:
            ap.error(str(e))
        for name in ["exact"] + modes:
            low = runners["exact w4a4" if name == "exact" else name]
            runners[f"plan:{name}"] = StepEngines({"w4a8": runners["exact w4a8"], "w4a4": low}, plan)
    features = FeatureModel(b.path(layout.DEMO_FEATURES)) if b.has(layout.DEMO_FEATURES) else None
    t0 = time.perf_counter()
    res = evaluate_runners(b.facts, layout.class_embedding(b), runners, open_decoder(b),
                           default_labels(b.facts, None, args.num), args.seed, cfg, features=features,
                           eps_mse=False)
    print(f"{args.num} samples, seed {args.seed}, η {args.eta:g}, no correction ({time.perf_counter() - t0:.0f} s)")
    print_rows(res.rows, 12)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bundle": args.bundle, "shrink": args.shrink, "seed": args.seed, **res.to_json()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
