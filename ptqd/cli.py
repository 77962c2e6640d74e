"""``ptqd``: the command line, a thin shell over :mod:`ptqd.api`.

A user error prints one line (``ptqd: error: ...``) and exits 1, wrong flags included; ``--debug``
shows the traceback. Anything else is a ptqd bug: its traceback, a line asking for a report, exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from ptqd import __version__
from ptqd.errors import PtqdError

BUG_REPORT = ("ptqd: internal error: this is a bug in ptqd, not in your input. Please report it with the command "
              "you ran and the traceback above.")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong flag on one line (exit 1, like every user error), not a usage block."""

    def error(self, message: str):
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _dumps(obj) -> str:
    """Strict JSON for --json: NaN and infinities (not JSON) become null."""
    from ptqd.validate import json_safe

    return json.dumps(json_safe(obj), indent=2, allow_nan=False)

EPILOG = """\
pipeline:  export -> calibrate -> build -> correct (+ plan) -> sample / eval   (one bundle directory)
           ptqd compile runs the first four, resumably; ptqd check gates engine regressions in CI

examples:
  ptqd export models/ldm/cin256-v2/model.ckpt --config configs/latent-diffusion/cin256-v2.yaml --out cin.bundle
  ptqd export path/to/diffusers-ldm --out ldm.bundle
  ptqd inspect cin.bundle
  ptqd calibrate cin.bundle && ptqd build cin.bundle --precisions w8a8,w4a8,w4a4,ort-int8
  ptqd sample cin.bundle --classes 88,207 --num 16 --out samples.png
  ptqd compile demo --out d.bundle && ptqd sample d.bundle --plan auto --out plan.png
  ptqd eval demo-out/demo.bundle --precisions fp32,w4a8,auto --num 500
  ptqd eval demo-out/demo.bundle --ablation
"""


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000.0
    return f"{n} {unit}"


def cmd_export(args) -> int:
    from ptqd import api

    schedule = api.parse_schedule(args.schedule) if args.schedule else None
    rec = api.export(args.model, args.out, config=args.config, schedule=schedule,
                     first_stage=not args.no_first_stage, validate=not args.no_validate, opset=args.opset,
                     exporter=args.exporter)
    val = rec.get("validation", {})
    checks = ", ".join(f"{k} max|onnx-torch| {v['worst_abs_error']:.2e}" for k, v in val.items()) or "validation off"
    print(f"exported {args.model} -> {args.out} ({checks})")
    return 0


def cmd_inspect(args) -> int:
    from ptqd import api

    info = api.inspect(args.bundle)
    if args.json:
        print(_dumps(info))
        return 0
    m = info["model"]
    cond = m["conditioning"]
    s = m["schedule"]
    print(f"bundle      {info['bundle']}  (schema v{info['schema_version']}, ptqd {info['producer'].get('version', '?')})")
    print(f"model       {m['family']} from {m['source']}; latent {'x'.join(map(str, m['latent_shape']))}"
          + (f", image {'x'.join(map(str, m['image_shape']))}" if m.get("image_shape") else ""))
    if cond["kind"] == "class":
        print(f"condition   class: {cond['num_classes']} classes, null class {cond['null_class']} "
              f"(context {cond['context_tokens']}x{cond['context_dim']})")
    else:
        print("condition   none (unconditional)")
    print(f"schedule    {s['kind']} beta {s.get('beta_start', '-')} -> {s.get('beta_end', '-')}, "
          f"T={s['num_train_timesteps']}, {m['prediction_type']}")
    if "macs_per_forward" in info:
        by = info["macs_by_kind"]
        n = info["layer_count"]
        print(f"MACs/fwd    {_human(info['macs_per_forward'], 'MAC')} at batch 1: conv {_human(by['conv'], 'MAC')}, "
              f"linear {_human(by['linear'], 'MAC')}, attention {_human(by['attention'], 'MAC')}")
        print(f"layers      {sum(n.values())}: {n['conv']} conv, {n['linear']} linear, {n['attention']} attention "
              f"matmuls; {info['weight_params'] / 1e6:.2f} M weight parameters")
    if info.get("bops"):
        bo = info["bops"]
        print(f"BOPs/fwd    FP32 {_human(bo['fp32'], 'BOPs')} (conv + linear MACs x 32 x 32; attention matmuls not counted)")
        for p, r in bo["precisions"].items():
            print(f"  {p:<9}{_human(r['bops'], 'BOPs'):>14}  {r['saving_vs_fp32']:5.1f}x less  ({r['source']})")
        if "plan" in bo:
            pl = bo["plan"]
            mix = ", ".join(f"{p} x{n}" for p, n in pl["precisions"].items())
            print(f"  {'plan':<9}{_human(pl['mean_bops_per_forward'], 'BOPs'):>14}  {pl['saving_vs_fp32']:5.1f}x less  "
                  f"(mean over {pl['steps']} steps: {mix})")
    print(f"stages      {', '.join(info['stages']) or 'none'}")
    print(f"files       {_human(info['total_bytes'])} in {len(info['files'])} files (checksums verified)")
    for rel, size in info["files"].items():
        print(f"  {_human(size):>10}  {rel}")
    return 0


def _classes(spec: str | None):
    from ptqd.errors import UserError

    if not spec:
        return None
    try:
        return [int(c) for c in spec.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--classes {spec!r}: expected comma-separated class indices, e.g. 0,1,2") from None


def _emit(args, obj, pretty) -> int:
    """``--json``: the object as JSON; otherwise the human table."""
    if args.json:
        print(_dumps(obj))
    else:
        pretty(obj)
    return 0


def _fmt(v, width: int, spec: str, suffix: str = "") -> str:
    return ("-" if v is None else format(v, spec) + suffix).rjust(width)


def print_eval(report: dict) -> None:
    cfg, ref = report["config"], report.get("reference", {})
    print(f"{cfg['num']} samples, seed {cfg['seed']}, {cfg['steps']} DDIM steps, eta {cfg['eta']}, "
          f"guidance {cfg['guidance']}")
    rows = report["rows"]
    w = max(12, 2 + max(len(r["precision"]) for r in rows))
    lat = any("unet_ms" in r for r in rows)
    print(f"{'precision':<{w}}{'FD':>9}{'FD vs FP':>10}{'class acc':>11}{'PSNR vs FP':>12}{'eps MSE':>11}"
          f"{'BOPs saving':>13}" + (f"{'UNet ms':>9}" if lat else f"{'seconds':>9}")
          + (f"{'img/s':>8}" if any("images_per_s" in r for r in rows) else ""))
    for r in rows:
        acc = None if r.get("class_acc") is None else 100 * r["class_acc"]
        print(f"{r['precision']:<{w}}{_fmt(r.get('fd'), 9, '.2f')}{_fmt(r.get('fd_vs_fp'), 10, '.2f')}"
              f"{_fmt(acc, 11, '.1f', '%')}"
              f"{_fmt(r.get('psnr_vs_fp'), 12, '.2f')}{_fmt(r.get('eps_mse_mean'), 11, '.2e')}"
              f"{_fmt(r.get('bops_saving'), 12, '.1f', 'x')}"
              + (_fmt(r.get("unet_ms"), 9, ".2f") if lat else f"{r['seconds']:9.1f}")
              + (_fmt(r.get("images_per_s"), 8, ".1f") if any("images_per_s" in r for r in rows) else ""))
    if ref:
        print(f"for scale: FD real vs real {ref['fd_real_half_vs_half']:.2f} (two halves of all digits), "
              f"{ref['fd_real_train_vs_held_out']:.2f} (train vs held-out at this sample count); "
              f"classifier accuracy on held-out digits {100 * ref['classifier_acc_held_out']:.1f}%")


def cmd_sample(args) -> int:
    from ptqd import api

    images, labels = api.sample(args.bundle, classes=_classes(args.classes), num=args.num, seed=args.seed,
                                steps=args.steps, eta=args.eta, guidance=args.guidance, out=args.out,
                                precision=args.plan, batch=args.batch, correction=args.correction)
    print(f"{len(images)} samples ({args.plan}, correction {args.correction}) -> "
          f"{args.out or '(not written: pass --out FILE.png|.npz)'}")
    return 0


def cmd_eval(args) -> int:
    from ptqd import api

    if args.ablation:
        precisions = [p for p in (args.precisions or "w4a8,w4a4,auto").split(",") if p and p != "fp32"]
        res = api.ablation(args.bundle, precisions=precisions, num=args.num, seed=args.seed, steps=args.steps,
                           guidance=args.guidance)
        if args.json:
            print(_dumps(res))
        else:
            for rep in res.values():
                print_eval(rep)
                print()
        return 0
    precisions = [p for p in (args.precisions or "fp32").split(",") if p]
    report = api.evaluate(args.bundle, precisions=precisions, num=args.num, seed=args.seed, steps=args.steps,
                          eta=args.eta, guidance=args.guidance, classes=_classes(args.classes),
                          features=args.features, correction=args.correction)
    return _emit(args, report, print_eval)


def cmd_correct(args) -> int:
    from ptqd import api

    rec = api.correct(args.bundle, samples=args.samples, holdout=args.holdout, seed=args.seed, device=args.device,
                      preset=args.preset)
    c = rec["config"]
    print(f"fitted k_t, bias_t, sigma_q,t over {c['steps']} steps on {c['samples'] - c['holdout']} "
          f"trajectories ({c['holdout']} held out; {rec['seconds']:.0f} s on {rec['device']})")
    for p, sm in rec["summary"].items():
        print(f"  {p}: held-out eps MSE {sm['eps_mse_uncorrected_holdout']:.3e} -> "
              f"{sm['eps_mse_gated_holdout']:.3e}; linear fit explains "
              f"{100 * sm['explained_variance_holdout']:.1f}% of the error variance; k_raw in "
              f"[{sm['k_raw_range'][0]:.3f}, {sm['k_raw_range'][1]:.3f}], sigma_q in "
              f"[{sm['sigma_q_range'][0]:.3f}, {sm['sigma_q_range'][1]:.3f}]")
    pl = api.plan(args.bundle, margin=args.margin, criterion=args.criterion, budget=args.budget, preset=args.preset)
    _print_plan(pl)
    return 0


def _print_plan(pl: dict) -> None:
    steps = pl["steps"]
    print(f"plan ({pl['criterion']}):")
    print("  " + "  ".join(f"t={s['t']}:{s['precision']}" for s in steps))


def cmd_plan(args) -> int:
    from ptqd import api

    _print_plan(api.plan(args.bundle, margin=args.margin, criterion=args.criterion, budget=args.budget,
                         reference=args.reference, preset=args.preset))
    return 0


def cmd_compile(args) -> int:
    from ptqd import api

    precisions = tuple(p for p in args.precisions.split(",") if p)
    res = api.compile(args.model, args.out, config=args.config, precisions=precisions, samples=args.samples,
                      steps=args.steps, guidance=args.guidance, margin=args.margin, criterion=args.criterion,
                      budget=args.budget, force=args.force, device=args.device, preset=args.preset)
    bo = res["bops"]
    print(f"bundle  {res['bundle']}")
    print(f"plan    {' '.join(res['plan'])}")
    if "plan" in bo:
        print(f"BOPs    plan {bo['plan']['saving_vs_fp32']:.1f}x less than FP32 per sample; "
              + ", ".join(f"{p} {r['saving_vs_fp32']:.1f}x" for p, r in bo["precisions"].items()))
    return 0


def cmd_calibrate(args) -> int:
    from ptqd import api

    rec = api.calibrate(args.bundle, samples=args.samples, steps=args.steps, eta=args.eta, guidance=args.guidance,
                        method=args.method, rounding=args.rounding, buckets=args.buckets, device=args.device,
                        preset=args.preset)
    sec = rec["seconds"]
    print(f"calibrated {rec['layers']} layers on {rec['calibration_inputs']} UNet inputs on {rec['device']}, "
          f"preset {rec['preset']} ({sec['total']:.0f} s: observe {sec['observe']:.0f}, H + weights "
          f"{sec['weights']:.0f}, ranges + write {sec['ranges_and_write']:.0f})")
    for p, r in rec["precisions"].items():
        errs = ", ".join(f"{k} {v:.2e}" for k, v in r["mean_layer_rel_error"].items())
        print(f"  {p}: mean layer output error (relative) {errs}")
    return 0


def cmd_build(args) -> int:
    from ptqd import api

    precisions = tuple(p for p in args.precisions.split(",") if p) if args.precisions else None
    recs = api.build(args.bundle, backend=args.backend, precisions=precisions, validate=not args.no_validate)
    if args.backend == "tensorrt":
        print_trt_build(recs)
        return 0
    print(f"{'engine':<10}{'int MACs':>9}{'size':>10}{'vs fake-quant (median)':>24}  kernels")
    for p, r in recs.items():
        v = r.get("validation_vs_fake_quant")
        ops = ", ".join(f"{k} {n}" for k, n in r["integer_kernel_ops"].items())
        print(f"{p:<10}{100 * r['integer_mac_share']:8.1f}%{_human(r['size_bytes']):>10}"
              f"{_fmt(v and v['median_rel_l2'], 24, '.2e')}  {ops}")
    return 0


def cmd_lint(args) -> int:
    from ptqd import api
    from ptqd.engines.lint import format_findings

    results = api.lint(args.bundle, target=args.target)
    if args.json:
        print(_dumps({g: [f.to_json() for f in found] for g, found in results.items()}))
    else:
        print(format_findings(results))
    bad = {g: found for g, found in results.items() if found}
    if bad:
        n = sum(len(f) for f in bad.values())
        print(f"ptqd: {n} {args.target} rule violation(s) in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


def print_trt_build(recs: dict) -> None:
    print(f"{'engine':<10}{'size':>10}{'int8/int4/fp16/fp32 layers':>28}{'vs ORT (median)':>17}  TensorRT, GPU")
    for p, r in recs.items():
        lp = r["layer_precisions"]
        v = r["buckets"][0].get("validation_vs_onnxruntime")
        mix = "/".join(str(lp.get(k, 0)) for k in ("int8", "int4", "fp16", "fp32"))
        print(f"{p:<10}{_human(r['size_bytes']):>10}{mix:>28}{_fmt(v and v['median_rel_l2'], 17, '.2e')}  "
              f"{r['tensorrt']}, {r['gpu'].get('name')}")


def cmd_demo(args) -> int:
    from ptqd import api

    res = api.demo(args.out, num=args.num, seed=args.seed, steps=args.steps, eta=args.eta, guidance=args.guidance)
    print(f"bundle  {res['bundle']}")
    print(f"plan    {' '.join(res['plan'])}")
    print(f"grid    {res['grid']}  (4 samples of each digit 0-9, sampled with the plan)")
    print_eval(res["eval"])
    print("rows: +ptqd = PTQD correction (k_t, bias_t; VSC when eta > 0); plan = step-aware mixed precision; "
          "UNet ms = one CFG-doubled forward (batch 2), median, the plan's weighted by its steps; img/s = UNet "
          "throughput at the sampler's batch (100 images, CFG-doubled)")
    print("the demo UNet is tiny: speed at real sizes (47 M, 400.9 M parameters) is "
          "`python benchmarks/speed_at_size.py --size mid|full`")
    return 0


def print_bench(res: dict) -> None:
    eng = res["engines"]
    bs = res["batches"]
    names = [k for k in eng if not k.startswith("_")]
    cols = [str(bs["single"])] + ([str(bs["cfg"])] if bs["cfg"] != bs["single"] else []) + [str(bs["large"])]
    print(f"UNet forward: median of >= {eng['fp32']['latency'][cols[0]]['runs']} runs after warm-up, engines "
          f"round-robin in one process; x = speed vs ONNX Runtime FP32 (> 1 is faster)")
    head = "".join(f"{'b' + c + ' ms':>10}{'x':>6}" for c in cols[:-1])
    print(f"{'engine':<12}{head}{'b' + cols[-1] + ' img/s':>12}{'x':>6}{'GFLOP/s':>9}{'load s':>8}{'+MB':>7}"
          f"{'size':>10}{'BOPs':>8}")
    for p in names:
        r = eng[p]
        lat = r["latency"]
        cells = "".join(f"{lat[c]['median_ms']:10.2f}{lat[c]['speedup_vs_ort_fp32']:6.2f}" for c in cols[:-1])
        big = lat[cols[-1]]
        mem = r.get("peak_rss_mb")
        extra = None if mem is None else mem - eng.get("_process_baseline_mb", 0)
        print(f"{p:<12}{cells}{big['samples_per_s']:12.0f}{big['speedup_vs_ort_fp32']:6.2f}"
              f"{_fmt(big['gflops'], 9, '.1f')}{r['load_s']:8.2f}{_fmt(extra, 7, '.0f')}"
              f"{(_human(r['size_bytes']) if r['size_bytes'] else '-'):>10}{_fmt(r.get('bops_saving'), 7, '.1f', 'x')}")
    if "_process_baseline_mb" in eng:
        print(f"+MB: peak resident memory of a fresh process with the engine, over "
              f"{eng['_process_baseline_mb']:.0f} MB for Python + ONNX Runtime alone")
    if "plan_resident" in res:
        pr = res["plan_resident"]
        print(f"the plan's runtime keeps {', '.join(pr['precisions'])} loaded: peak {pr['peak_rss_mb']:.0f} MB "
              f"(+{pr['peak_rss_mb'] - eng.get('_process_baseline_mb', 0):.0f} MB)")
    print(f"\nend to end: {res['e2e_images']} images, {res['steps']} DDIM steps, decode included")
    print(f"{'sampler':<14}{'s/image':>9}{'x':>6}{'engine':>8}{'decoder':>9}{'runtime':>9}{'switches':>10}{'BOPs':>8}")
    for k, r in res["sampling"].items():
        print(f"{k:<14}{r['seconds_per_image']:9.4f}{r['speedup_vs_ort_fp32']:6.2f}{100 * r['engine_share']:7.1f}%"
              f"{100 * r['decoder_share']:8.1f}%{100 * r['runtime_overhead_share']:8.1f}%{r['engine_switches']:10d}"
              f"{_fmt(r.get('bops_saving'), 7, '.1f', 'x')}")
    print("runtime = sampler arithmetic, guidance, PTQD correction and engine switching (all but engine and decoder)")
    for n in res.get("notes", []):
        print(f"note: {n}")


def cmd_bench(args) -> int:
    from ptqd.bench import bench
    from ptqd.bundle import Bundle

    precisions = [p for p in args.precisions.split(",") if p] if args.precisions else None
    res = bench(args.bundle, precisions=precisions, runs=args.runs, threads=args.threads, large_batch=args.large_batch,
                torch_peer=not args.no_torch, memory=not args.no_memory,
                progress=None if args.json else (lambda m: print(f"... {m}", file=sys.stderr)))
    with Bundle.transaction(args.bundle) as w:
        w.write_json("reports/bench.json", res)
    return _emit(args, res, print_bench)


def cmd_check(args) -> int:
    from ptqd.check import check, format_rows

    res = check(args.bundle, baseline=args.baseline, update=args.update, junit=args.junit, num=args.num)
    if args.update:
        print(f"baseline written: {res['updated']}")
        for s, v in res["engines"].items():
            print(f"  {s:<10}" + ", ".join(f"{k} {x:.4g}" for k, x in v.items()))
        return 0
    print(f"ptqd check {args.bundle} against {res['baseline']} (made {res['baseline_created']})")
    print(format_rows(res["rows"]))
    bad = [r for r in res["rows"] if not r["passed"]]
    if bad:
        print(f"FAILED: {len(bad)} of {len(res['rows'])} checks regressed")
        return 1
    print(f"passed: {len(res['rows'])} checks ({res['seconds']:.0f} s)")
    return 0


def cmd_report(args) -> int:
    from ptqd.report import report

    res = report(args.bundle, run_eval=args.eval, eval_num=args.num, run_bench=args.bench)
    for f in res["files"]:
        print(f"wrote {args.bundle}/{f}")
    return 0


def cmd_train_demo(args) -> int:
    from ptqd import api

    log = api.train_demo(args.out, seed=args.seed)
    print(_dumps(log))
    return 0


def _sampling_args(p, num: int) -> None:
    p.add_argument("--num", type=int, default=num, help=f"number of samples in total (default {num})")
    p.add_argument("--classes", help="comma-separated class labels, cycled over the samples (default: all classes)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise depends only on (seed, i): samples are "
                                                       "paired across engines (default 0)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20: t = 951, 901, ..., 1)")
    p.add_argument("--eta", type=float, default=0.0, help="0 = deterministic DDIM, 1 = DDPM-like (default 0)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")


def _effort_args(p, device: bool = True) -> None:
    from ptqd.budget import BUDGETS

    p.add_argument("--preset", choices=BUDGETS, default="auto",
                   help="compute preset: trajectories for calibrate, correct and plan (default auto: by the "
                        "model's MACs per forward; minimal | quick | default | thorough, see ptqd/budget.py)")
    if device:
        p.add_argument("--device", default="auto",
                       help="torch device of the calibration and correction work: auto (cuda when torch sees a GPU, "
                            "else cpu), cpu, cuda or cuda:N")


def _plan_args(p) -> None:
    p.add_argument("--criterion", choices=("sensitivity", "snr"), default="sensitivity",
                   help="plan rule: measured per-step sensitivity under a BOPs budget (default), or PTQD's SNR rule")
    p.add_argument("--budget", type=float, default=0.9,
                   help="sensitivity: mean BOPs per step at most this multiple of w4a8's (default 0.9)")
    p.add_argument("--margin", type=float, default=1.0,
                   help="snr: a step may use precision p when SNR_Q(p) >= margin x SNR_F (default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ptqd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile a latent diffusion UNet into post-training-quantized engines (PTQD).")
    p.add_argument("--version", action="version", version=f"ptqd {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    cp = sub.add_parser("compile", help="export -> calibrate -> build -> correct -> plan, resumable",
                        description="The whole pipeline into one bundle. A finished stage whose inputs are unchanged "
                                    "is reused, so a rerun after an interruption continues where it stopped.")
    cp.add_argument("model", help="demo, a diffusers directory or a CompVis .ckpt/.safetensors")
    cp.add_argument("--out", required=True, help="bundle directory")
    cp.add_argument("--config", help="CompVis YAML config")
    cp.add_argument("--precisions", default="w8a8,w4a8,w4a4,ort-int8")
    cp.add_argument("--samples", type=int, default=None, help="calibration trajectories (default: the preset's)")
    cp.add_argument("--steps", type=int, default=None, help="DDIM steps of the calibrated schedule (default: the "
                                                            "preset's, 20 up to quick)")
    cp.add_argument("--guidance", type=float, default=3.0, help="CFG scale of calibration and correction (default 3)")
    _plan_args(cp)
    _effort_args(cp)
    cp.add_argument("--force", action="store_true", help="rerun every stage")
    cp.set_defaults(func=cmd_compile)

    e = sub.add_parser("export", help="UNet -> validated FP32 ONNX bundle with a layer table",
                       description="Export a UNet (and its first-stage decoder) to a new bundle. The ONNX graph is "
                                   "checked against torch at several timesteps; the bundle is only written if it "
                                   "matches.")
    e.add_argument("model", help="a diffusers directory (pipeline or bare unet) or a CompVis .ckpt/.safetensors")
    e.add_argument("--out", required=True, help="bundle directory to create (replaced atomically if it exists)")
    e.add_argument("--config", help="CompVis YAML config (default: <checkpoint>.yaml or config.yaml beside it)")
    e.add_argument("--schedule", help="noise schedule KIND:BETA_START:BETA_END:T when the model has none "
                                      "(e.g. scaled_linear:0.0015:0.0195:1000)")
    e.add_argument("--no-first-stage", action="store_true", help="do not export the first-stage decoder")
    e.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check (not advised)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18: fast GroupNorm on ORT)")
    e.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch exporter (default torchscript: fast, module-scoped node names)")
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="model facts, MACs, layers and files of a bundle",
                       description="Print what a bundle holds; verifies every file's checksum.")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("calibrate", help="observe activations over the denoising steps; quantize per precision",
                       description="Run the FP model along real sampler trajectories (classes x seeds, every step, "
                                   "CFG-doubled batch), choose activation ranges and round weights for w8a8, w4a8 "
                                   "and w4a4. Needs the source model the bundle was exported from.")
    c.add_argument("bundle")
    c.add_argument("--samples", type=int, default=None,
                   help="calibration trajectories (labels cycle the classes; default: the preset's, 32 for the demo)")
    c.add_argument("--steps", type=int, default=None, help="DDIM steps of the calibrated schedule (default: the "
                                                           "preset's, 20 up to quick)")
    c.add_argument("--eta", type=float, default=0.0, help="sampler eta of the calibration trajectories (default 0)")
    c.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the calibration trajectories (default 3)")
    c.add_argument("--method", choices=("mse", "minmax", "percentile"), default="mse",
                   help="activation range choice (default mse: clipping search)")
    c.add_argument("--rounding", choices=("nearest", "gptq"), default="gptq", help="weight rounding (default gptq)")
    c.add_argument("--buckets", type=int, default=1, help="timestep buckets, each with its own activation scales and engine (default 1)")
    _effort_args(c)
    c.set_defaults(func=cmd_calibrate)

    bl = sub.add_parser("build", help="one engine per precision, validated against the fake-quant model",
                        description="Write a QDQ graph per precision and build its engine; each is checked against "
                                    "the fake-quant torch model. ort-int8 is ONNX Runtime's own quantize_static on "
                                    "the same calibration inputs, for comparison.")
    bl.add_argument("bundle")
    bl.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime")
    bl.add_argument("--precisions", default=None,
                    help="comma-separated (default: w8a8,w4a8,w4a4,ort-int8 on onnxruntime; fp16,w8a8,w4a8,w4a4 on "
                         "tensorrt)")
    bl.add_argument("--no-validate", action="store_true", help="skip the check against the fake-quant model")
    bl.set_defaults(func=cmd_build)

    lt = sub.add_parser("lint", help="check each precision's QDQ graph against a backend's rules (CPU only)",
                        description="Check the QDQ graph of every precision against the target backend's rules "
                                    "(TensorRT: symmetric int8, constant positive scales, per-channel weight axes, "
                                    "INT4 only as block-quantized MatMul weights, Q/DQ where TensorRT fuses them, "
                                    "opset). Lints the built graphs, or the ones the calibration would build. "
                                    "Exits 1 when a rule is broken.")
    lt.add_argument("bundle")
    lt.add_argument("--target", choices=("tensorrt",), default="tensorrt")
    lt.add_argument("--json", action="store_true", help="machine-readable output")
    lt.set_defaults(func=cmd_lint)

    s = sub.add_parser("sample", help="sample images with one engine",
                       description="Sample with the FP32 graph or one engine; writes a PNG grid or an NPZ "
                                   "(images uint8 NxHxWxC, labels).")
    s.add_argument("bundle")
    _sampling_args(s, 16)
    s.add_argument("--plan", "--precision", dest="plan", default="fp32",
                   help="fp32, an engine (w8a8, w4a8, w4a4, ort-int8), auto (the bundle's step-aware mixed-precision "
                        "plan) or a plan FILE.json (default fp32)")
    s.add_argument("--correction", choices=("auto", "on", "off"), default="auto",
                   help="PTQD's noise correction and, with --eta > 0, variance schedule calibration (default auto: "
                        "on where fitted)")
    s.add_argument("--out", help="FILE.png (grid) or FILE.npz (arrays)")
    s.add_argument("--batch", type=int, default=64, help="samples per engine call (default 64)")
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("eval", help="quality vs FP on the same seeds: FD, class accuracy, PSNR, eps MSE",
                       description="Evaluate precisions against FP32 on the same seeds and classes. FD uses the "
                                   "bundle's feature model (the demo ships one) or --features.")
    v.add_argument("bundle")
    _sampling_args(v, 500)
    v.add_argument("--precisions", default="fp32", help="comma-separated engines, e.g. fp32,ort-int8,w8a8,w4a8,w4a4; "
                                                        "FP32 is always the first row")
    v.add_argument("--features", help="ONNX model image [N,C,H,W] in [-1,1] -> 'features' (+ 'logits') for FD")
    v.add_argument("--correction", choices=("auto", "on", "off"), default="auto",
                   help="apply PTQD's correction to every quantized row (default auto: on where fitted)")
    v.add_argument("--ablation", action="store_true",
                   help="PTQD ablation for --precisions (default w4a8,w4a4,auto): uncorrected, + correlated "
                        "correction, + bias at eta 0; uncorrected, + k + bias, + VSC at eta 1")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_eval)

    co = sub.add_parser("correct", help="fit PTQD's noise correction and the mixed-precision plan",
                        description="Run the FP and each precision's fake-quant model on the same x_t along FP "
                                    "trajectories; fit k_t, bias_t[c] and sigma_q,t per step (calib/correction.json), "
                                    "then the step-aware plan (calib/plan.json).")
    co.add_argument("bundle")
    co.add_argument("--samples", type=int, default=None, help="trajectories (default: the preset's, 64 for the demo)")
    co.add_argument("--holdout", type=int, default=None,
                    help="of those, held out to measure the fit (default: the preset's, 16 for the demo)")
    co.add_argument("--seed", type=int, default=1, help="trajectory seed (default 1; calibration uses 0)")
    _plan_args(co)
    _effort_args(co)
    co.set_defaults(func=cmd_correct)

    pl = sub.add_parser("plan", help="recompute the step-aware mixed-precision plan",
                        description="sensitivity (default): measure how much each step's precision moves the final "
                                    "samples away from FP's, then pick the plan with the least damage whose mean BOPs "
                                    "stay under --budget x the reference's. snr (PTQD's rule): per step the cheapest "
                                    "precision whose corrected quantization SNR clears --margin x the sample's SNR "
                                    "abar/(1-abar).")
    pl.add_argument("bundle")
    _plan_args(pl)
    pl.add_argument("--reference", default="w4a8", help="sensitivity: the precision the budget is relative to "
                                                         "(default w4a8)")
    _effort_args(pl, device=False)
    pl.set_defaults(func=cmd_plan)


    d = sub.add_parser("demo", help="the demo model end to end (README's main command)",
                       description="Export (or reuse) the demo bundle, sample a grid of digits, print the quality "
                                   "table.")
    d.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    _sampling_args(d, 500)
    d.set_defaults(func=cmd_demo)

    be = sub.add_parser("bench", help="latency, throughput, memory and size per engine; end-to-end sampling",
                        description="Time every engine and the peers (PyTorch eager FP32, ONNX Runtime FP32, ONNX "
                                    "Runtime quantize_static INT8) in one process, round-robin, medians after "
                                    "warm-up; ratios against ONNX Runtime FP32. Writes reports/bench.json.")
    be.add_argument("bundle")
    be.add_argument("--precisions", help="engines to time (default: every built engine)")
    be.add_argument("--runs", type=int, default=20, help="timed runs per engine and batch (default 20, min 10)")
    be.add_argument("--large-batch", type=int, default=32, help="batch for throughput (default 32)")
    be.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's, one per core)")
    be.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager peer")
    be.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement (a process per engine)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    ck = sub.add_parser("check", help="regression gate for CI: engines vs a stored baseline",
                        description="Recompute seeded engine outputs and end-to-end samples; compare with the "
                                    "baseline (eps drift, sample drift, PSNR vs FP, FD, class accuracy). Exits 1 on "
                                    "a regression. Tolerances: see `python -c 'import ptqd.check; "
                                    "help(ptqd.check)'`.")
    ck.add_argument("bundle")
    ck.add_argument("--baseline", help="baseline JSON (NPZ beside it); default BUNDLE/reports/check_baseline.json")
    ck.add_argument("--update", action="store_true", help="write a new baseline from the current engines")
    ck.add_argument("--junit", help="also write JUnit XML here")
    ck.add_argument("--num", type=int, default=64, help="end-to-end samples when writing a baseline (default 64)")
    ck.set_defaults(func=cmd_check)

    rp = sub.add_parser("report", help="regenerate reports/: sample grids, correction and plan plots, index",
                        description="Side-by-side samples (FP, each engine, the plan; same seeds), plots of k_t, "
                                    "bias, sigma_q and the plan with its SNR curves, and an index.md.")
    rp.add_argument("bundle")
    rp.add_argument("--eval", action="store_true", help="rerun the quality evaluation first (--num samples)")
    rp.add_argument("--num", type=int, default=200)
    rp.add_argument("--bench", action="store_true", help="rerun the benchmark first")
    rp.set_defaults(func=cmd_report)

    t = sub.add_parser("train-demo", help="retrain the demo model and digit classifier (~20 min on 2 cores)")
    t.add_argument("--out", help="directory for the weights (default: the shipped ones, in place)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_demo)
    p.commands = tuple(sub.choices)  # for error messages that point at `ptqd COMMAND --help`
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        msg, verb = str(e), next((a for a in argv or sys.argv[1:] if a in parser.commands), None)
        if verb and msg.endswith("(see `ptqd --help`)"):  # e.g. unrecognized arguments, found by the top parser
            msg = msg.replace("`ptqd --help`", f"`ptqd {verb} --help`")
        print(f"ptqd: error: {msg}", file=sys.stderr)
        return 1
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except PtqdError as e:
        if args.debug:
            raise
        print(f"ptqd: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ptqd: interrupted; the bundle was left as it was", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the last resort: a bug in ptqd, shown in full and said to be one
        traceback.print_exc()
        print(BUG_REPORT, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
