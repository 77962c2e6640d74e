"""W4A4 by reconstruction: can learning the quantizers against the FP model's own outputs make 4-bit activations hold?

    python benchmarks/w4a4_reconstruct.py demo-out/demo.bundle [--objective step|rollout] [--weights]
        [--weighting none|x0] [--train 512] [--iters N] [--lr 1e-3] [--wlr 3e-3] [--num 64] [--json out.json]

A study on the bundle's own w4a4 calibration (torch, no engine), in the spirit of BRECQ / QDrop / LSQ: every
4-bit layer's activation quantizer (scale and zero point) and, with ``--weights``, its integer weights (on their
fixed per-channel scales) are learned by gradient descent through straight-through rounding, starting from what
``ptqd calibrate`` chose (MSE ranges, GPTQ weights). No training data: the targets are the FP model's.

- ``--objective step``: the guided ε of each UNet call along FP trajectories (``--train`` samples, seed 3,
  20 DDIM steps, η 0) against FP's ε there. ``--weighting x0`` weights each step by how much an ε error there
  moves x̂_0 ((NSR_t − NSR_prev)², NSR = √((1 − ᾱ)/ᾱ)); ``none`` weights them equally.
- ``--objective rollout``: the whole 20-step sampler is unrolled and the final latents are matched to FP's.

Reported: the per-step ε error on 32 held-out FP trajectories (seed 5) before and after (step objective), and
the paired PSNR vs FP of the decoded samples (``--num`` samples, seed 7, indices 1000+, no correction) of the
exact fake-quant model (``calib.fakequant``) that the learned integers and ranges give: what an engine would run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--objective", choices=("step", "rollout"), default="step")
    ap.add_argument("--weights", action="store_true", help="learn the integer weights too")
    ap.add_argument("--weighting", choices=("none", "x0"), default="none", help="step objective's step weights")
    ap.add_argument("--train", type=int, default=512, help="training trajectories (default 512)")
    ap.add_argument("--iters", type=int, default=960, help="optimizer steps (default 960)")
    ap.add_argument("--batch", type=int, default=64, help="UNet inputs (step) or trajectories (rollout) per step")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam lr of log-scales and zero points")
    ap.add_argument("--wlr", type=float, default=3e-3, help="Adam lr of the weights, in integer steps")
    ap.add_argument("--num", type=int, default=64, help="samples for paired PSNR (default 64)")
    ap.add_argument("--precision", default="w4a4")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from ptqd.bundle import Bundle, layout
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.runtime.loader import default_labels, open_decoder, sampler_config
    from ptqd.runtime.pipeline import contexts, decode, sample_latents
    from ptqd.runtime.sampler import DDIMSampler, NoiseSource
    from ptqd.stages.common import calib_layers, load_source
    from ptqd.tools.metrics import psnr

    torch.manual_seed(0)
    b = Bundle.open(args.bundle)
    guidance = float(b.stage("calibrate")["config"]["guidance"])
    cfg = sampler_config(b.facts, 20, 0.0, guidance)
    loaded, table = load_source(b), layout.class_embedding(b)
    layers = calib_layers(b, args.precision)
    decoder = open_decoder(b)
    fp = TorchRunner(loaded.unet, "cpu")
    samp = DDIMSampler(b.facts.schedule.alphas_cumprod, cfg.spacing)
    samp.set_timesteps(20)
    steps = [int(t) for t in samp.timesteps]

    score_labels, score_idx = default_labels(b.facts, None, args.num), np.arange(args.num) + 1000
    with torch.no_grad():  # FP's samples, sampled once for the scores before and after
        ref = decode(decoder, sample_latents(fp, b.facts, table, score_labels, score_idx, 7, cfg),
                     b.facts.scale_factor)

    def score(lqs) -> float:
        with torch.no_grad():
            lat = sample_latents(TorchRunner(fake_quant_model(loaded.unet, lqs), "cpu"), b.facts, table,
                                 score_labels, score_idx, 7, cfg)
        return float(np.mean(np.minimum(psnr(decode(decoder, lat, b.facts.scale_factor), ref), 100.0)))

    def guided(m, x, t, cc, cn):
        ec, eu = m(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cc, cn])).chunk(2)
        return eu + guidance * (ec - eu)

    def rollout(m, x, cc, cn):  # DDIM, η 0, as runtime.sampler computes it
        for t in steps:
            a_t, a_p = samp.alphas(t)
            e = guided(m, x, torch.full((len(x),), float(t)), cc, cn)
            x = np.sqrt(a_p) * (x - np.sqrt(1 - a_t) * e) / np.sqrt(a_t) + np.sqrt(1 - a_p) * e
        return x

    def calls(num, offset, seed):
        """(x, t, cond, null, FP guided ε) of every UNet call along ``num`` FP trajectories."""
        labels, idx = default_labels(b.facts, None, num), np.arange(num) + offset
        rec = []
        with torch.no_grad():
            sample_latents(fp, b.facts, table, labels, idx, seed, cfg, observe=lambda i, t, x, ctx, eps: rec.append(
                (x.copy(), np.full(len(x), float(t), np.float32), ctx.cond.copy(), ctx.null.copy())))
        x, t, cc, cn = (torch.from_numpy(np.concatenate([r[k] for r in rec])) for k in range(4))
        with torch.no_grad():
            y = torch.cat([guided(loaded.unet, *(v[i:i + 256] for v in (x, t, cc, cn))) for i in range(0, len(x), 256)])
        return x, t, cc, cn, y

    def nsr(a):
        return np.sqrt((1 - a) / a)

    weight_of = {float(t): (nsr(samp.alphas(t)[0]) - nsr(samp.alphas(t)[1])) ** 2 if args.weighting == "x0" else 1.0
                 for t in steps}
    mean_w = float(np.mean(list(weight_of.values())))

    def ste(v):
        return (torch.round(v) - v).detach() + v

    class Learned(torch.nn.Module):
        """One layer: learnable input quantizer (log-scale, zero point) and integer weights, STE rounding."""

        def __init__(self, orig, lq):
            super().__init__()
            self.lq, self.orig, self.conv = lq, orig, not isinstance(orig, torch.nn.Linear)
            learn = lq.a_bits < 8 or lq.w_bits < 8
            self.log_s = torch.nn.Parameter(torch.tensor(float(np.log(lq.act_in.scale))), requires_grad=learn)
            self.z = torch.nn.Parameter(torch.tensor(float(lq.act_in.zero_point)), requires_grad=learn)
            self.w = torch.nn.Parameter(torch.from_numpy(lq.w_int.astype(np.float32)),
                                        requires_grad=args.weights and learn)
            self.ws = torch.from_numpy(lq.w_scale.reshape((-1,) + (1,) * (lq.w_int.ndim - 1)).astype(np.float32))
            self.wq = 2 ** (lq.w_bits - 1) - 1
            self.bias = None if orig.bias is None else orig.bias.detach().clone()

        def forward(self, x):
            s, z, q = self.log_s.exp(), ste(self.z), self.lq.act_in.qmax
            x = (torch.clamp(ste(x / s) + z, 0, q) - z) * s
            w = torch.clamp(ste(self.w), -self.wq, self.wq) * self.ws
            if not self.conv:
                return F.linear(x, w, self.bias)
            o = self.orig
            y = F.conv2d(x, w, self.bias, o.stride, o.padding, o.dilation, o.groups)
            out = self.lq.act_out
            if out is None:
                return y
            return (torch.clamp(ste(y / out.scale) + out.zero_point, 0, out.qmax) - out.zero_point) * out.scale

        def export(self):
            lq = self.lq
            a = dataclasses.replace(lq.act_in, scale=float(np.float32(self.log_s.exp().item())),
                                    zero_point=int(np.clip(round(self.z.item()), 0, lq.act_in.qmax)))
            w_int = torch.clamp(torch.round(self.w), -self.wq, self.wq).detach().numpy().astype(np.int8)
            bias_q = lq.bias_q
            if bias_q is not None and self.bias is not None:
                bias_q = np.round(self.bias.double().numpy() / (np.float32(a.scale) * lq.w_scale).astype(np.float64)
                                  ).astype(np.int32)
            return dataclasses.replace(lq, act_in=a, w_int=w_int, bias_q=bias_q)

    model = copy.deepcopy(loaded.unet)
    for p in model.parameters():
        p.requires_grad_(False)
    learned = []
    for lq in layers:
        parent_name, _, leaf = lq.module.rpartition(".")
        parent = model.unet.get_submodule(parent_name) if parent_name else model.unet
        orig = parent[int(leaf)] if leaf.isdigit() else getattr(parent, leaf)
        if isinstance(orig, torch.nn.Conv1d):
            raise SystemExit("1-D convs are not handled by this study")
        m = Learned(orig, lq)
        if leaf.isdigit():
            parent[int(leaf)] = m
        else:
            setattr(parent, leaf, m)
        learned.append(m)

    held = calls(32, 5000, 5)

    def per_step(m) -> list[float]:
        x, t, cc, cn, y = held
        with torch.no_grad():
            e = torch.cat([((guided(m, *(v[i:i + 256] for v in (x, t, cc, cn))) - y[i:i + 256]) ** 2).flatten(1).mean(1)
                           for i in range(0, len(x), 256)])
        return [float(e[t == float(s)].mean()) for s in steps]

    out = {"bundle": args.bundle, "args": vars(args), "before": {"psnr": score(layers)}}
    out["before"]["eps_error_per_step"] = per_step(fake_quant_model(loaded.unet, layers))
    print(f"{args.precision} as calibrated: paired PSNR vs FP {out['before']['psnr']:.2f} dB; held-out ε error, "
          f"first / middle / last step {out['before']['eps_error_per_step'][0]:.4f} / "
          f"{out['before']['eps_error_per_step'][10]:.4f} / {out['before']['eps_error_per_step'][-1]:.4f}", flush=True)
    if args.objective == "step":
        data = calls(args.train, 2000, 3)
    else:
        labels, idx = default_labels(b.facts, None, args.train), np.arange(args.train) + 2000
        ctx = contexts(b.facts, table, labels, guidance)
        x_T = torch.from_numpy(NoiseSource(3, idx, tuple(b.facts.latent_shape)).draw())
        cc, cn = torch.from_numpy(ctx.cond), torch.from_numpy(ctx.null)
        with torch.no_grad():
            final = torch.cat([rollout(loaded.unet, x_T[i:i + 128], cc[i:i + 128], cn[i:i + 128])
                               for i in range(0, args.train, 128)])
        data = (x_T, cc, cn, final)
    groups = [{"params": [p for m in learned for p in (m.log_s, m.z) if p.requires_grad], "lr": args.lr}]
    if args.weights:
        groups.append({"params": [m.w for m in learned if m.w.requires_grad], "lr": args.wlr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)
    t0, losses = time.perf_counter(), []
    for k in range(args.iters):
        j = torch.randint(0, len(data[0]), (args.batch,))
        if args.objective == "step":
            x, t, cc, cn, y = (v[j] for v in data)
            w = torch.tensor([weight_of[float(v)] / mean_w for v in t.tolist()])
            loss = (((guided(model, x, t, cc, cn) - y) ** 2).flatten(1).mean(1) * w).mean()
        else:
            loss = F.mse_loss(rollout(model, *(v[j] for v in data[:3])), data[3][j])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (k + 1) % max(args.iters // 10, 1) == 0:
            print(f"step {k + 1}/{args.iters}: loss {np.mean(losses[-50:]):.5f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    new = [m.export() for m in learned]
    out["after"] = {"psnr": score(new), "eps_error_per_step": per_step(fake_quant_model(loaded.unet, new)),
                    "seconds": round(time.perf_counter() - t0, 1)}
    a = out["after"]
    print(f"after {args.objective} reconstruction ({'ranges + weights' if args.weights else 'ranges'}, weighting "
          f"{args.weighting}): paired PSNR vs FP {a['psnr']:.2f} dB; held-out ε error, first / middle / last step "
          f"{a['eps_error_per_step'][0]:.4f} / {a['eps_error_per_step'][10]:.4f} / {a['eps_error_per_step'][-1]:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
