"""The CLI's verbs: each maps its flags to one API call and prints the result (``--json``: strict JSON)."""

from __future__ import annotations

import json
import sys

from ptqd.cli.cluster import cluster_options
from ptqd.cli.tables import fmt, print_eval


def _dumps(obj) -> str:
    """Strict JSON for --json: NaN and infinities (not JSON) become null."""
    from ptqd.validate import json_safe

    return json.dumps(json_safe(obj), indent=2, allow_nan=False)


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000.0
    return f"{n} {unit}"


def cmd_export(args) -> int:
    from ptqd import api

    schedule = api.parse_schedule(args.schedule) if args.schedule else None
    rec = api.export(args.model, args.out, config=args.config, schedule=schedule, first_stage=not args.no_first_stage,
                     validate=not args.no_validate, opset=args.opset, exporter=args.exporter, prompts=args.prompts,
                     outliers=args.outliers, rank_budget=args.rank_budget,
                     outlier_layers=args.outlier_layers)
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
    elif cond["kind"] == "text":
        print(f"condition   text: {cond['num_classes']} encoded prompts (row {cond['null_class']} the negative), "
              f"context {cond['context_tokens']}x{cond['context_dim']}")
    else:
        print("condition   none (unconditional)")
    print(f"schedule    {s['kind']} beta {s.get('beta_start', '-')} -> {s.get('beta_end', '-')}, "
          f"T={s['num_train_timesteps']}, {m['prediction_type']}")
    print(f"sampler     {_sampler_line(m.get('sampler'))}")
    if info.get("correction"):
        c = info["correction"]
        print(f"correction  fitted on {c['sampler']}, {c['steps']} steps, {c['trajectories']} trajectories "
              f"({c['held_out']} held out); other samplers and step counts read it interpolated in t")
    if "macs_per_forward" in info:
        by = info["macs_by_kind"]
        n = info["layer_count"]
        print(f"MACs/fwd    {_human(info['macs_per_forward'], 'MAC')} at batch 1: conv {_human(by['conv'], 'MAC')}, "
              f"linear {_human(by['linear'], 'MAC')}, attention {_human(by['attention'], 'MAC')}")
        print(f"layers      {sum(n.values())}: {n['conv']} conv, {n['linear']} linear, {n['attention']} attention "
              f"matmuls; {info['weight_params'] / 1e6:.2f} M weight parameters")
    if info.get("calibration"):
        c = info["calibration"]
        att = {"float": "float", "qk": "Q·Kᵀ on 8-bit inputs, P·V float", "int8": "Q·Kᵀ and P·V on 8-bit inputs"}
        print(f"calibrated  preset {c['preset']}, {c['method']} ranges, {c['rounding']} weights on the "
              f"{c['weight_grid']} grid; attention matmuls {att.get(c['attention'], c['attention'])}")
    if info.get("outliers"):
        o, e = info["outliers"], info["outliers"]["w4a4_layer_rel_error"]
        share = o.get("layer_share", 1.0)
        chosen = f" (--outlier-layers {share:g}: the layers where it helps most)" if share < 1.0 else ""
        print(f"outliers    {o['mode']}: {o['layers']} layers rewritten{chosen}, {o['smoothed']} smoothed, 8-bit low-rank branches "
              f"({o['branch_macs_share']:.1%} of MACs); w4a4 layer error {e['before']:.4f} -> {e['after']:.4f} "
              f"(mean over the rewritten layers)")
    if info.get("bops"):
        bo = info["bops"]
        print(f"BOPs/fwd    FP32 {_human(bo['fp32'], 'BOPs')} (conv + linear MACs x 32 x 32; attention matmuls not counted)")
        for p, r in bo["precisions"].items():
            print(f"  {p:<11}{_human(r['bops'], 'BOPs'):>14}  {r['saving_vs_fp32']:5.1f}x less  ({r['source']})")
        if "plan" in bo:
            pl = bo["plan"]
            mix = ", ".join(f"{p} x{n}" for p, n in pl["precisions"].items())
            print(f"  {'plan':<11}{_human(pl['mean_bops_per_forward'], 'BOPs'):>14}  {pl['saving_vs_fp32']:5.1f}x less  "
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


def _sampler_line(stored) -> str:
    """The bundle's own sampler in one line (what `--sampler auto` runs)."""
    from ptqd.errors import UserError
    from ptqd.runtime.schedulers import resolve

    try:
        spec = resolve(stored)
    except UserError as e:
        return f"unusable ({e})"
    keys = ("timestep_spacing", "steps_offset", "use_karras_sigmas", "final_sigmas_type")
    cfg = dict(spec.config)
    return f"{spec.name} ({spec.cls}: " + ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg) + ")"


def cmd_sample(args) -> int:
    from ptqd import api

    prompts = list(args.prompt or [])
    if args.prompts:
        from ptqd.runtime.text import read_prompts

        prompts += read_prompts(args.prompts)
    latents = None
    if args.latents:
        from ptqd.runtime.pipe import load_latents

        latents = load_latents(args.latents)
    num = args.num if args.num is not None else (len(latents) if latents is not None and latents.ndim == 4 else
                                                 len(prompts) if prompts else 16)
    images, labels = api.sample(args.bundle, classes=_classes(args.classes), num=num, seed=args.seed,
                                steps=args.steps, eta=args.eta, guidance=args.guidance, out=args.out,
                                precision=args.plan, batch=args.batch, correction=args.correction,
                                prompts=prompts or None, negative_prompt=args.negative_prompt, backend=args.backend,
                                sampler=args.sampler, latents=latents, cluster=cluster_options(args),
                                shard_size=args.shard_size, original_size=_pair(args.original_size, "--original-size"),
                                crops_coords_top_left=_pair(args.crop_top_left, "--crop-top-left"),
                                target_size=_pair(args.target_size, "--target-size"))
    print(f"{len(images)} samples ({args.plan}, correction {args.correction}, sampler {args.sampler}) -> "
          f"{args.out or '(not written: pass --out FILE.png|.npz)'}")
    return 0


def _pair(text: str | None, flag: str) -> tuple[float, float] | None:
    """``--original-size 512,768`` -> (512.0, 768.0); a malformed value is a one-line error."""
    if text is None:
        return None
    from ptqd.errors import UserError

    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{flag} {text}: expected two numbers separated by a comma, e.g. 1024,1024") from None
    return a, b


def cmd_eval(args) -> int:
    from ptqd import api

    cluster = cluster_options(args)
    if args.ablation:
        precisions = [p for p in (args.precisions or "w4a8,w4a4,auto").split(",") if p and p != "fp32"]
        res = api.ablation(args.bundle, precisions=precisions, num=args.num, seed=args.seed, steps=args.steps,
                           guidance=args.guidance, batch=args.batch, cluster=cluster, shard_size=args.shard_size)
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
                          features=args.features, correction=args.correction, backend=args.backend,
                          sampler=args.sampler, batch=args.batch, cluster=cluster, shard_size=args.shard_size)
    return _emit(args, report, print_eval)


def cmd_correct(args) -> int:
    from ptqd import api

    rec = api.correct(args.bundle, samples=args.samples, holdout=args.holdout, seed=args.seed, batch=args.batch,
                      device=args.device,
                      preset=args.preset, gate_samples=args.gate_samples, gate_ranges=args.gate_ranges,
                      gate_budget=args.gate_budget, cluster=cluster_options(args), shard_size=args.shard_size,
                      sampler=args.sampler)
    c = rec["config"]
    where = f"; FP trajectories on {rec['sharded']}" if rec.get("sharded") else ""
    print(f"fitted k_t, bias_t, sigma_q,t over {c['steps']} steps of {c['sampler']} on {c['samples'] - c['holdout']} "
          f"trajectories ({c['holdout']} held out; {rec['seconds']:.0f} s on {rec['device']}{where})")
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
    if any(s["precision"] == "w4a4" for s in steps):
        print("  note: w4a4 steps save BOPs, not time on ptqd's backends: ONNX Runtime, OpenVINO and TensorRT run "
              "4-bit activations on int8 kernels, at about w4a8's latency (docs/ptqd-correction-and-plans.md)")


def cmd_plan(args) -> int:
    from ptqd import api

    _print_plan(api.plan(args.bundle, margin=args.margin, criterion=args.criterion, budget=args.budget,
                         reference=args.reference, preset=args.preset))
    return 0


def cmd_pack(args) -> int:
    from ptqd import api

    r = api.pack(args.bundle, args.out, plan=args.plan, backend=args.backend)
    print(f"packed {r['from']} -> {args.out}: {r['plan']} ({', '.join(r['precisions'])}) on {r['backend']}, "
          f"{r['files']} files, {r['size_bytes'] / 1e6:.1f} MB of {r['source_size_bytes'] / 1e6:.1f} MB")
    return 0


def cmd_compile(args) -> int:
    from ptqd import api

    precisions = tuple(p for p in args.precisions.split(",") if p)
    res = api.compile(args.model, args.out, config=args.config, precisions=precisions, samples=args.samples,
                      steps=args.steps, guidance=args.guidance, margin=args.margin, criterion=args.criterion,
                      budget=args.budget, force=args.force, device=args.device, preset=args.preset,
                      prompts=args.prompts, recipe=args.recipe, gate_samples=args.gate_samples,
                      gate_ranges=args.gate_ranges, gate_budget=args.gate_budget, backend=args.backend,
                      cluster=cluster_options(args), weight_grid=args.weight_grid, sampler=args.sampler,
                      attention=args.attention, outliers=args.outliers, rank_budget=args.rank_budget,
                      outlier_layers=args.outlier_layers)
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
                        preset=args.preset, recipe=args.recipe, cluster=cluster_options(args),
                        weight_grid=args.weight_grid, attention=args.attention)
    sec = rec["seconds"]
    att = f" and {rec['attention_matmuls']} attention matmuls" if rec.get("attention_matmuls") else ""
    weights = "weights" if rec.get("config", {}).get("rounding") == "nearest" else "H + weights"
    print(f"calibrated {rec['layers']} layers{att} on {rec['calibration_inputs']} UNet inputs on {rec['device']}, "
          f"preset {rec['preset']} ({sec['total']:.0f} s: observe {sec['observe']:.0f}, {weights} "
          f"{sec['weights']:.0f}, ranges + write {sec['ranges_and_write']:.0f})")
    for p, r in rec["precisions"].items():
        errs = (", ".join(f"{k} {v:.2e}" for k, v in r["mean_layer_rel_error"].items())
                or "not measured (nearest rounding runs no H pass)")
        print(f"  {p}: mean layer output error (relative) {errs}")
    return 0


def cmd_build(args) -> int:
    from ptqd import api

    precisions = tuple(p for p in args.precisions.split(",") if p) if args.precisions else None
    recs = api.build(args.bundle, backend=args.backend, precisions=precisions, validate=not args.no_validate,
                     float_precision=args.float_precision, act_grid=args.act_grid)
    if args.backend == "tensorrt":
        print_trt_build(recs)
        return 0
    if args.backend == "auto":
        print_ort_build(recs["onnxruntime"])
        if "openvino" in recs:
            print_ov_build(recs["openvino"])
        c = recs["choice"]
        print(f"backend auto: {c['backend']} (" + ", ".join(f"{k} {v:.1f} ms" for k, v in c["score_ms"].items())
              + f"; sum of median UNet ms over {', '.join(c['precisions'])}, batch "
              f"{'/'.join(map(str, c['batches']))}; {c['cpu']})")
        return 0
    if args.backend == "openvino":
        print_ov_build(recs)
        return 0
    print_ort_build(recs)
    return 0


def print_ov_build(recs: dict) -> None:
    print(f"{'engine':<12}{'size':>10}{'i4 constants':>14}{'vs fake-quant (median)':>24}  verdict")
    for p, r in recs.items():
        v = r.get("validation_vs_fake_quant")
        if "vs_fp32" in r:  # the NNCF peer: no fake-quant model of its numerics, so its distance from FP32
            verdict = (f"the peer ({r['calibration_items']} calibration inputs, {r['quantize_seconds']:.0f} s): "
                       f"{r['vs_fp32']['median_rel_l2']:.2e} from FP32 (median)")
        else:
            verdict = (v or {}).get("verdict", "not validated")
        print(f"{p:<12}{_human(r['size_bytes']):>10}{r['i4_constants']:>14}"
              f"{fmt(v and v['median_rel_l2'], 24, '.2e')}  {verdict}")
    for p, r in recs.items():
        if "float_precision_why" in r:
            print(f"{p}: float parts in {r['float_precision']} ({r['float_precision_why']})")
        if "activation_grids" in r:
            grids = ", ".join(f"{k} {n}" for k, n in r["activation_grids"].items())
            print(f"{p}: layer inputs {grids} ({r['act_grid']}; {r.get('act_grid_why', '--act-grid ' + r['act_grid'])})")


def print_ort_build(recs: dict) -> None:
    print(f"{'engine':<10}{'int MACs':>9}{'size':>10}{'vs fake-quant (median)':>24}  kernels")
    for p, r in recs.items():
        v = r.get("validation_vs_fake_quant")
        ops = ", ".join(f"{k} {n}" for k, n in r["integer_kernel_ops"].items())
        print(f"{p:<10}{100 * r['integer_mac_share']:8.1f}%{_human(r['size_bytes']):>10}"
              f"{fmt(v and v['median_rel_l2'], 24, '.2e')}  {ops}")


def cmd_lint(args) -> int:
    from ptqd import api
    from ptqd.engines.tensorrt.lint import format_findings

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
        print(f"{p:<10}{_human(r['size_bytes']):>10}{mix:>28}{fmt(v and v['median_rel_l2'], 17, '.2e')}  "
              f"{r['tensorrt']}, {r['gpu'].get('name')}")


def cmd_demo(args) -> int:
    from ptqd import api

    res = api.demo(args.out, num=args.num, seed=args.seed, steps=args.steps, eta=args.eta, guidance=args.guidance)
    print(f"bundle  {res['bundle']}")
    print(f"plan    {' '.join(res['plan'])}")
    print(f"grid    {res['grid']}  (4 samples of each digit 0-9, sampled with the plan)")
    print_eval(res["eval"])
    print("rows: +ptqd = the parts of PTQD's correction (k_t, bias_t; VSC when eta > 0) that the end-to-end gate "
          "kept (calib/correction.json); plan = step-aware mixed precision; "
          "UNet ms = one CFG-doubled forward (batch 2), median, the plan's weighted by its steps; img/s = UNet "
          "throughput at the sampler's batch (100 images, CFG-doubled)")
    if res.get("openvino") and "error" in res["openvino"]:
        print(f"OpenVINO backend skipped: {res['openvino']['error']}")
    elif res.get("openvino"):
        print("OpenVINO backend (`ptqd build --backend openvino`, same engines): " + ", ".join(
            f"{p.split('@')[0]} {v['images_per_s']:.0f} img/s ({v['vs_ort_fp32']:.2f}x ORT FP32)"
            for p, v in res["openvino"].items()))
    print("the demo UNet is tiny: speed at real sizes (47 M, 400.9 M parameters) is "
          "`python benchmarks/speed_at_size.py --size mid|full`")
    return 0


def print_executed(summaries: dict) -> None:
    """OpenVINO's executed graphs side by side: convs/matmuls per runtime precision, time shares."""
    if not summaries:
        return
    print("\nOpenVINO executed graph at batch 1 (the plugin's own per-layer counters): conv/matmul layers by the "
          "precision they ran in; share of layer time")
    print(f"{'engine':<15}{'int8':>6}{'float':>7}{'reorders':>10}{'converts':>10}{'int8 time':>11}{'float time':>12}"
          f"{'reorder':>9}{'other':>7}{'layer ms':>10}")
    for p, x in summaries.items():
        c, sh = x["compute_layers"], x["time_share"]
        flt = sum(v for k, v in c.items() if k != "int8" and k != "int4")
        ft = sum(v for k, v in sh.items() if k.endswith(" compute") and not k.startswith("int"))
        print(f"{p:<15}{c.get('int8', 0):6d}{flt:7d}{x['reorders']:10d}{x['converts']:10d}"
              f"{100 * sh.get('int8 compute', 0):10.1f}%{100 * ft:11.1f}%{100 * sh.get('reorder', 0):8.1f}%"
              f"{100 * (sh.get('other', 0) + sh.get('convert', 0) + sh.get('fakequantize', 0)):6.1f}%"
              f"{x['layer_ms']:10.2f}")


def print_bench(res: dict) -> None:
    eng = res["engines"]
    bs = res["batches"]
    names = [k for k in eng if not k.startswith("_")]
    cols = [str(bs["single"])] + ([str(bs["cfg"])] if bs["cfg"] != bs["single"] else []) + [str(bs["large"])]
    print(f"UNet forward: median of >= {eng['fp32']['latency'][cols[0]]['runs']} runs after warm-up, engines "
          f"round-robin in one process; x = speed vs ONNX Runtime FP32 (> 1 is faster)")
    head = "".join(f"{'b' + c + ' ms':>10}{'x':>6}" for c in cols[:-1])
    print(f"{'engine':<15}{head}{'b' + cols[-1] + ' img/s':>12}{'x':>6}{'GFLOP/s':>9}{'load s':>8}{'+MB':>7}"
          f"{'size':>10}{'BOPs':>8}")
    for p in names:
        r = eng[p]
        lat = r["latency"]
        cells = "".join(f"{lat[c]['median_ms']:10.2f}{lat[c]['speedup_vs_ort_fp32']:6.2f}" for c in cols[:-1])
        big = lat[cols[-1]]
        mem = r.get("peak_rss_mb")
        extra = None if mem is None else mem - eng.get("_process_baseline_mb", 0)
        print(f"{p:<15}{cells}{big['samples_per_s']:12.0f}{big['speedup_vs_ort_fp32']:6.2f}"
              f"{fmt(big['gflops'], 9, '.1f')}{r['load_s']:8.2f}{fmt(extra, 7, '.0f')}"
              f"{(_human(r['size_bytes']) if r['size_bytes'] else '-'):>10}{fmt(r.get('bops_saving'), 7, '.1f', 'x')}")
    print_executed({p: eng[p]["executed"] for p in names if eng[p].get("executed")})
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
              f"{fmt(r.get('bops_saving'), 7, '.1f', 'x')}")
    print("runtime = sampler arithmetic, guidance, PTQD correction and engine switching (all but engine and decoder)")
    for n in res.get("notes", []):
        print(f"note: {n}")


def cmd_bench(args) -> int:
    from ptqd.bundle import Bundle, layout
    from ptqd.tools.bench import bench

    precisions = [p for p in args.precisions.split(",") if p] if args.precisions else None
    res = bench(args.bundle, precisions=precisions, runs=args.runs, threads=args.threads, large_batch=args.large_batch,
                torch_peer=not args.no_torch, memory=not args.no_memory, peers=not args.no_peers,
                progress=None if args.json else (lambda m: print(f"... {m}", file=sys.stderr)))
    with Bundle.transaction(args.bundle) as w:
        w.write_json(layout.BENCH_JSON, res)
    return _emit(args, res, print_bench)


def cmd_check(args) -> int:
    from ptqd.tools.check import check, format_rows

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
    from ptqd.tools.report import report

    res = report(args.bundle, run_eval=args.eval, eval_num=args.num, run_bench=args.bench)
    for f in res["files"]:
        print(f"wrote {args.bundle}/{f}")
    return 0


def cmd_train_demo(args) -> int:
    from ptqd import api

    log = api.train_demo(args.out, seed=args.seed)
    print(_dumps(log))
    return 0
