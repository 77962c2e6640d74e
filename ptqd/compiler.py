"""PTQD stages after the engines: correction fit, mixed-precision plan, BOPs; ``compile`` runs the
whole pipeline, reusing every stage whose inputs are unchanged. Re-exported by :mod:`ptqd.api`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptqd.bundle import Bundle, writes_bundle
from ptqd.errors import UserError

CORRECTION_JSON = "calib/correction.json"
PLAN_JSON = "calib/plan.json"
CALIBRATED = ("w8a8", "w4a8", "w4a4")


def _calib_layers(b: Bundle, precision: str) -> list[dict] | None:
    rel = f"calib/{precision}.json" if b.has(f"calib/{precision}.json") else f"calib/{precision}.b0.json"
    return b.read_json(rel)["layers"] if b.has(rel) else None


def precision_bops(b: Bundle, precision: str, rows: list[dict] | None = None) -> float:
    """BOPs per forward of one precision: the calibrated layers when there are, else the default selection."""
    from ptqd.api import UNET_LAYERS
    from ptqd.bops import bops, layer_bits

    rows = rows if rows is not None else b.read_json(UNET_LAYERS)["layers"]
    calibrated = _calib_layers(b, precision) if precision in CALIBRATED else None
    return bops(rows, layer_bits(rows, precision, calibrated))


def bops_table(b: Bundle) -> dict[str, Any]:
    """BOPs per forward for FP32 and each precision (built or not), and for the plan summed over its steps."""
    from ptqd.api import UNET_LAYERS

    if not b.has(UNET_LAYERS):
        return {}
    rows = b.read_json(UNET_LAYERS)["layers"]
    fp = precision_bops(b, "fp32", rows)
    out: dict[str, Any] = {"fp32": fp, "precisions": {}}
    for p in CALIBRATED + ("ort-int8",):
        v = precision_bops(b, p, rows)
        out["precisions"][p] = {"bops": v, "saving_vs_fp32": fp / v,
                                "source": "calibrated layers" if p in CALIBRATED and _calib_layers(b, p) else
                                ("quantize_static: every conv/linear" if p == "ort-int8" else "default layer selection")}
    if b.has(PLAN_JSON):
        plan = b.read_json(PLAN_JSON)
        per = {p: precision_bops(b, p, rows) for p in {s["precision"] for s in plan["steps"]}}
        total = sum(per[s["precision"]] for s in plan["steps"])
        n = len(plan["steps"])
        out["plan"] = {"bops_per_sample": total, "steps": n, "mean_bops_per_forward": total / n,
                       "saving_vs_fp32": fp * n / total,
                       "precisions": {p: sum(s["precision"] == p for s in plan["steps"]) for p in sorted(per)}}
    return out


def digest(b: Bundle, prefixes: tuple[str, ...]) -> dict[str, str]:
    """sha256 of the bundle files a stage consumed (what makes a finished stage reusable)."""
    return {rel: rec["sha256"] for rel, rec in sorted(b.files.items()) if rel.startswith(prefixes)}


CALIB_FILES = tuple(f"calib/{p}." for p in CALIBRATED)
BUILD_INPUTS = CALIB_FILES + ("calib/feeds.npz", "unet.onnx")


def _fake_quant_runners(b: Bundle, loaded, precisions, device=None) -> dict:
    """precision -> (step index -> torch runner of that step's timestep bucket)."""
    import numpy as np

    from ptqd.api import bucket_suffix
    from ptqd.calib.calibrate import load_params
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.runtime.torch_runner import TorchRunner

    buckets = b.stage("calibrate").get("buckets") or [{"steps": None}]
    out = {}
    for p in precisions:
        runners, step_to_bucket = [], {}
        for k, bk in enumerate(buckets):
            sfx = bucket_suffix(k, len(buckets))
            layers = load_params(b.read_json(f"calib/{p}{sfx}.json"), np.load(b.path(f"calib/{p}{sfx}.npz")))
            runners.append(TorchRunner(fake_quant_model(loaded.unet, layers), device))
            for s in bk.get("steps") or []:
                step_to_bucket[s] = k
        out[p] = (lambda rs, m: (lambda i: rs[m.get(i, 0)]))(runners, step_to_bucket)
    return out


@writes_bundle()
def correct(bundle, samples: int | None = None, holdout: int | None = None, seed: int = 1,
            batch: int | None = None, device: str = "auto", preset: str = "auto",
            progress: bool | None = None, gate: bool = True, gate_samples: int | None = None,
            gate_seed: int = 101, gate_ranges: int = 4) -> dict[str, Any]:
    """Fit PTQD's correction (k_t, bias_t[c], σ_q,t) for every calibrated precision; write
    calib/correction.json. Runs the source FP model and each precision's fake-quant model on the
    same x_t along FP trajectories of the calibrated schedule (steps, guidance), seeds distinct from
    the calibration's; the last ``holdout`` samples only measure the fit. ``samples``, ``holdout`` and
    ``batch`` default to the compute ``preset`` (``ptqd.budget``); the torch models run on ``device``.

    Also fits the conditional correction, and, with ``gate`` and the engines built, decides what
    ``--correction auto`` applies from final samples of ``gate_samples`` (default 2 x ``samples``)
    held-out trajectories of seed ``gate_seed`` at η 0 and 1 (``calib.gate``)."""
    import time

    import numpy as np

    from ptqd.budget import preset_for
    from ptqd.calib.device import describe, resolve_device

    from ptqd.api import CLASS_EMBEDDING, _load_source, _progress, _sampler_config, default_labels
    from ptqd.calib.correction import collect, fit_precision
    from ptqd.runtime.torch_runner import TorchRunner

    b = Bundle.open(bundle)
    cal = b.stage("calibrate")
    if cal is None:
        raise UserError(f"{b.root} is not calibrated: run `ptqd calibrate {b.root}` first")
    from ptqd.api import UNET_LAYERS

    pre = preset_for(preset, b.read_json(UNET_LAYERS))
    samples = pre.correct_samples if samples is None else samples
    holdout = pre.holdout if holdout is None else holdout
    batch = pre.correct_batch if batch is None else batch
    if samples < 2 or not 1 <= holdout < samples:
        raise UserError(f"--samples must be >= 2 and --holdout in [1, samples - 1], got {samples} and {holdout}")
    c = cal["config"]
    facts = b.facts
    scfg = _sampler_config(facts, c["steps"], c["eta"], c["guidance"])
    precisions = [p for p in CALIBRATED if b.has(f"calib/{p}.json") or b.has(f"calib/{p}.b0.json")]
    dev = resolve_device(device)
    t0 = time.perf_counter()
    loaded = _load_source(b)
    table = np.load(b.path(CLASS_EMBEDDING)) if b.has(CLASS_EMBEDDING) else None
    labels = default_labels(facts, None, samples)
    quant = _fake_quant_runners(b, loaded, precisions, dev)
    with _progress(samples * scfg.steps, "correct", progress) as bar:
        bar.set_postfix_str(f"FP vs {', '.join(precisions)} on the same x_t")
        ts, eps, delta = collect(TorchRunner(loaded.unet, dev), quant, facts, table, labels, seed, scfg,
                                 batch=batch, progress=bar)
    fits = {p: fit_precision(eps, delta[p], ts, holdout) for p in precisions}
    from ptqd.calib.correction import fit_conditional

    for p in precisions:  # the conditional correction (--correction conditional), same data
        fits[p]["conditional"] = fit_conditional(eps, delta[p], ts, holdout)
    if gate:  # what --correction auto applies: decided on final samples of held-out seeds (calib/gate.py)
        from ptqd.api import open_engine
        from ptqd.calib.gate import gate_engine
        from ptqd.runtime.correction import CorrectionTable

        built = b.read_json("engines/onnxruntime/build.json") if b.has("engines/onnxruntime/build.json") else {}
        gl = default_labels(facts, None, gate_samples or 2 * samples)
        fp_eng = open_engine(b, "fp32", allow_spinning=False) if any(p in built for p in precisions) else None
        for p in [p for p in precisions if p in built]:
            eng = open_engine(b, p, allow_spinning=False)
            fits[p]["gate"] = gate_engine(eng, fp_eng, CorrectionTable.from_json(fits[p]), facts, table, gl,
                                          gate_seed, scfg, ranges=gate_ranges, batch=batch)
            eng.close()
        if fp_eng is not None:
            fp_eng.close()
    summary = {}
    for p, f in fits.items():
        h = [s["holdout"] for s in f["steps"]]
        summary[p] = {"explained_variance_holdout": float(np.mean([x["explained_variance"] for x in h])),
                      "eps_mse_uncorrected_holdout": float(np.mean([x["mse_uncorrected"] for x in h])),
                      "eps_mse_corrected_holdout": float(np.mean([x["mse_corrected"] for x in h])),
                      "eps_mse_gated_holdout": float(np.mean([s["holdout_gated"]["mse_corrected"]
                                                              for s in f["steps"]])),
                      "k_raw_range": [min(s["raw"]["k_raw"] for s in f["steps"]),
                                      max(s["raw"]["k_raw"] for s in f["steps"])],
                      "gates": {g: sum(s["gate"] == g for s in f["steps"]) for g in ("none", "k", "bias", "k+bias")},
                      "sigma_q_range": [min(s["sigma_q"] for s in f["steps"]), max(s["sigma_q"] for s in f["steps"])],
                      "eps_mse_conditional_holdout": float(np.mean([s["holdout"]["mse_corrected"]
                                                                    for s in f["conditional"]["steps"]]))
                      if f["conditional"]["steps"] else None,
                      "applied": [("+".join(s["parts"]) or "none") for s in f["gate"]["steps"]]
                      if "gate" in f else "no gate (engine not built): nothing applied under --correction auto"}
    record = {"config": {"samples": samples, "holdout": holdout, "seed": seed, "steps": scfg.steps,
                         "gate": {"samples": gate_samples or 2 * samples, "seed": gate_seed, "ranges": gate_ranges}
                         if gate else None,
                         "eta": scfg.eta, "guidance": scfg.guidance, "spacing": scfg.spacing,
                         "model": "fake-quant torch model of each precision (engines match it; see build.json)"},
              "summary": summary, "precisions": fits, "seconds": round(time.perf_counter() - t0, 1),
              "device": describe(dev), "preset": pre.name}
    with Bundle.transaction(b.root) as w:
        # The previous plan stays until `plan` replaces it: still a valid plan (its engines are built),
        # and its record's inputs no longer match correction.json, so compile recomputes it.
        w.write_json(CORRECTION_JSON, record)
        w.set_stage("correct", {"config": record["config"], "inputs": digest(b, CALIB_FILES),
                                "summary": summary, "seconds": record["seconds"]})
    return record


def measure_damage(b: Bundle, candidates, reference: str, samples: int = 64, seed: int = 2) -> dict[str, Any]:
    """For every step i and precision p: how much the final latents move away from FP's when step i
    alone runs p instead of ``reference`` (mean squared difference, same noise), with the PTQD
    correction on. Runs the built ONNX Runtime engines on the calibrated schedule.

    The steps before i are the reference's own, so each variant resumes from the reference
    trajectory's x at step i: S(S+1)/2 engine steps per precision instead of S²."""
    import numpy as np

    from ptqd.api import CLASS_EMBEDDING, _sampler_config, default_labels, open_engine
    from ptqd.runtime.correction import CORRECTION_PARTS, CorrectionTable, Plan, StepEngines
    from ptqd.runtime.pipeline import sample_latents
    from ptqd.runtime.sampler import DDIMSampler

    c = b.stage("calibrate")["config"]
    facts = b.facts
    cfg = _sampler_config(facts, c["steps"], 0.0, c["guidance"])
    sampler = DDIMSampler(facts.schedule.alphas_cumprod, cfg.spacing)
    sampler.set_timesteps(cfg.steps)
    ts = [int(t) for t in sampler.timesteps]
    table = np.load(b.path(CLASS_EMBEDDING)) if b.has(CLASS_EMBEDDING) else None
    labels, idx = default_labels(facts, None, samples), np.arange(samples)
    fitted = b.read_json(CORRECTION_JSON)["precisions"]
    tables = {p: CorrectionTable.from_json(fitted[p], applied=True) for p in candidates if p in fitted}
    runners = {p: open_engine(b, p, allow_spinning=False) for p in ["fp32", *candidates]}
    fp = sample_latents(runners["fp32"], facts, table, labels, idx, seed, cfg)
    states: list[np.ndarray] = []  # the reference trajectory's x before each step

    def keep(i, t, x, ctx, eps):
        states.append(x.copy())

    ref = StepEngines(runners, Plan(ts, [reference] * len(ts)), tables, CORRECTION_PARTS)
    base = float(np.mean((sample_latents(ref, facts, table, labels, idx, seed, cfg, observe=keep) - fp) ** 2))
    damage = {}
    for p in candidates:
        if p == reference:
            continue
        damage[p] = []
        for i in range(len(ts)):
            eng = StepEngines(runners, Plan(ts, [p if j == i else reference for j in range(len(ts))]), tables,
                              CORRECTION_PARTS)
            x0 = sample_latents(eng, facts, table, labels, idx, seed, cfg, start=(i, states[i]))
            damage[p].append(float(np.mean((x0 - fp) ** 2)) - base)
    for r in runners.values():
        r.close()
    return {"reference_error": base, "damage": damage, "samples": samples, "seed": seed}


@writes_bundle()
def plan(bundle, margin: float = 1.0, precisions=None, criterion: str = "sensitivity", budget: float = 0.9,
         reference: str = "w4a8", samples: int | None = None, preset: str = "auto") -> dict[str, Any]:
    """Step-aware mixed precision from the fitted correction: write calib/plan.json (with the curves).

    ``criterion``: "snr" (PTQD: cheapest precision whose corrected SNR_Q clears margin·SNR_F) or
    "sensitivity" (default: measured damage of each step's precision on the final samples, cheapest
    plan set under ``budget`` × the BOPs of ``reference``; see ``budget_plan``)."""
    from ptqd.calib.correction import budget_plan, make_plan

    b = Bundle.open(bundle)
    if not b.has(CORRECTION_JSON):
        raise UserError(f"{b.root} has no fitted correction: run `ptqd correct {b.root}` first")
    from ptqd.validate import real

    real("--margin", margin, 0, lo_open=True)
    real("--budget", budget, 0, lo_open=True)
    if criterion not in ("snr", "sensitivity"):
        raise UserError(f"--criterion must be snr or sensitivity, got {criterion!r}")
    if not 0 < budget:
        raise UserError(f"--budget must be > 0 (a multiple of the reference's BOPs), got {budget}")
    corr = b.read_json(CORRECTION_JSON)["precisions"]
    built = b.read_json("engines/onnxruntime/build.json") if b.has("engines/onnxruntime/build.json") else {}
    cands = [p for p in (precisions or corr) if p in corr and p in built]
    if not cands:
        raise UserError(f"no precision has both a fitted correction and a built engine in {b.root}: "
                        f"run `ptqd build {b.root}`")
    cost = {p: precision_bops(b, p) for p in cands}
    rec = make_plan({p: corr[p] for p in cands}, cost, b.facts.schedule.alphas_cumprod, margin)
    if criterion == "sensitivity":
        if reference not in cands:
            raise UserError(f"--reference {reference} has no engine and correction; choose from {', '.join(cands)}")
        from ptqd.api import UNET_LAYERS
        from ptqd.budget import preset_for

        if samples is None:
            samples = preset_for(preset, b.read_json(UNET_LAYERS)).plan_samples
        meas = measure_damage(b, cands, reference, samples)
        try:
            chosen = budget_plan(meas["damage"], cost, reference, budget)
        except ValueError as e:
            raise UserError(str(e)) from None
        for i, s in enumerate(rec["steps"]):
            s["precision"] = chosen[i]
            s["damage"] = {p: d[i] for p, d in meas["damage"].items()}
        rec["criterion"] = (f"measured: each step's damage to the final samples (latent MSE vs FP when that step "
                            f"alone leaves {reference}), cheapest damage per BOP first, mean BOPs <= {budget:g} x "
                            f"{reference}")
        rec.update({"budget": budget, "reference": reference, "reference_error": meas["reference_error"],
                    "measurement": {k: meas[k] for k in ("samples", "seed")}})
    rec["criterion_name"] = criterion
    rec["correction_gate"] = _gate_plan(b, rec)
    with Bundle.transaction(b.root) as w:
        w.write_json(PLAN_JSON, rec)
        w.set_stage("plan", {"margin": margin, "criterion": criterion, "budget": budget, "reference": reference,
                             "precisions": cands, "inputs": digest(b, (CORRECTION_JSON, "engines/onnxruntime/build.json")),
                             "plan": [s["precision"] for s in rec["steps"]]})
    return rec


def _gate_plan(b: Bundle, rec: dict) -> dict:
    """Does the plan with each precision's gated correction beat the plan uncorrected on the gate's
    held-out samples (``calib.gate.gate_plan``)? If not, ``--plan auto --correction auto`` runs it
    uncorrected."""
    import numpy as np

    from ptqd.api import CLASS_EMBEDDING, _sampler_config, default_labels, open_engine
    from ptqd.calib.gate import gate_plan
    from ptqd.runtime.correction import CORRECTION_PARTS, CorrectionTable, Plan, StepEngines

    corr = b.read_json(CORRECTION_JSON)
    g = corr.get("config", {}).get("gate")
    pl = Plan.from_json(rec)
    fitted = corr["precisions"]
    tables = {p: CorrectionTable.from_json(fitted[p], applied=True) for p in pl.precisions if p in fitted}
    used = any(tables[p].parts[list(tables[p].t).index(t)] for t, p in zip(pl.t, pl.precision)
               if p in tables and t in tables[p].t)
    if not g or not used:
        return {"helps": bool(used), "note": "no gate record" if not g else "the gated parts never run in this plan"}
    c = b.stage("calibrate")["config"]
    cfg = _sampler_config(b.facts, c["steps"], 0.0, c["guidance"])
    emb = np.load(b.path(CLASS_EMBEDDING)) if b.has(CLASS_EMBEDDING) else None
    runners = {p: open_engine(b, p, allow_spinning=False) for p in ["fp32", *pl.precisions]}
    try:
        return gate_plan(StepEngines(runners, pl, tables, CORRECTION_PARTS), StepEngines(runners, pl, {}, ()),
                         runners["fp32"], b.facts, emb, default_labels(b.facts, None, g["samples"]), g["seed"], cfg)
    finally:
        for r in runners.values():
            r.close()


def step_engines(b: Bundle, spec: str = "fp32", correction: str | tuple = "auto", threads: int | None = None,
                 cache: dict | None = None):
    """The runtime for a plan spec: ``auto`` (calib/plan.json), a precision, or a plan FILE.

    ``correction``: "auto" (on where fitted), "on" (error when not fitted), "off", or a tuple of parts
    ("k", "bias", "vsc"). Returns (engine for sample_latents, label). FP32 without correction is a
    plain runner."""
    import json

    from ptqd.api import open_engine
    from ptqd.runtime.correction import CORRECTION_PARTS, CorrectionTable, Plan, StepEngines

    if spec == "auto":
        if not b.has(PLAN_JSON):
            raise UserError(f"{b.root} has no plan: run `ptqd compile` or `ptqd correct {b.root}` first")
        pl = Plan.from_json(b.read_json(PLAN_JSON))
    elif spec.endswith(".json"):
        try:
            pl = Plan.from_json(json.loads(Path(spec).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--plan {spec}: not a plan file ({e}); expected {{\"steps\": [{{\"t\": 951, "
                            f"\"precision\": \"w4a4\"}}, ...]}}") from None
    else:
        pl = Plan.fixed(spec)
    from ptqd.runtime.correction import CONDITIONAL_PARTS, PTQD_PARTS

    use = {"auto": CORRECTION_PARTS, "on": PTQD_PARTS, "conditional": CONDITIONAL_PARTS, "off": ()}.get(correction)
    if use is None:
        if isinstance(correction, str):
            raise UserError(f"--correction must be auto, on, conditional or off, got {correction!r}")
        use = tuple(correction)
    tables = {}
    needs = [p for p in pl.precisions if p in CALIBRATED]
    if use and needs:
        if not b.has(CORRECTION_JSON):
            if correction != "auto":
                raise UserError(f"{b.root} has no fitted correction: run `ptqd correct {b.root}` (or "
                                "--correction off)")
        else:
            fitted = b.read_json(CORRECTION_JSON)["precisions"]
            tables = {p: CorrectionTable.from_json(fitted[p], applied=correction == "auto") for p in needs
                      if p in fitted}
            if spec == "auto" and correction == "auto" and \
                    not b.read_json(PLAN_JSON).get("correction_gate", {}).get("helps", True):
                for t in tables.values():  # the plan's gate: corrected was not better than uncorrected
                    t.parts = [()] * len(t.t)
            if "cond" in use and correction != "auto" and any(t.a is None for t in tables.values()):
                raise UserError(f"{b.root} has no conditional correction fit: rerun `ptqd correct {b.root}`")
    cache = {} if cache is None else cache  # precision -> runner, shared by the rows of an eval
    runners = {}
    for p in pl.precisions:
        if p not in cache:
            cache[p] = open_engine(b, p, threads, allow_spinning=False)
        runners[p] = cache[p]
    if not tables and len(pl.precisions) == 1:
        return runners[pl.precisions[0]], pl.precisions[0]
    label = "plan" if spec == "auto" else Path(spec).stem if spec.endswith(".json") else spec
    if tables and use:
        label += "+" + "+".join(use) if isinstance(correction, tuple) else \
            {"auto": "+ptqd", "on": "+ptqd-raw", "conditional": "+cond"}[correction]
    return StepEngines(runners, pl, tables, use), label


def plan_bops(b: Bundle, spec: str, steps: int, spacing: str = "compvis") -> float:
    """Mean BOPs per forward of a precision or plan over the sampler's steps."""
    import json

    from ptqd.runtime.correction import Plan
    from ptqd.runtime.sampler import DDIMSampler

    if spec == "auto":
        pl = Plan.from_json(b.read_json(PLAN_JSON))
    elif spec.endswith(".json"):
        pl = Plan.from_json(json.loads(Path(spec).read_text()))
    else:
        return precision_bops(b, spec)
    sampler = DDIMSampler(b.facts.schedule.alphas_cumprod, spacing)
    sampler.set_timesteps(steps)
    cost = {p: precision_bops(b, p) for p in pl.precisions}
    return sum(cost[pl.at(float(t))] for t in sampler.timesteps) / steps


def _reusable(b: Bundle, stage: str, inputs: tuple[str, ...], **config) -> bool:
    """A finished stage is reused when its record's inputs (sha256) and settings are unchanged."""
    rec = b.stage(stage)
    if not rec or rec.get("inputs") != digest(b, inputs):
        return False
    return all(rec.get(k) == v if k != "config" else all(rec["config"].get(ck) == cv for ck, cv in v.items())
               for k, v in config.items())


@writes_bundle("out", create=True)
def compile(model, out, config=None, precisions=CALIBRATED, samples: int | None = None, steps: int | None = None,
            guidance: float = 3.0, correction_samples: int | None = None, holdout: int | None = None,
            margin: float = 1.0, criterion: str = "sensitivity", budget: float = 0.9, force: bool = False,
            device: str = "auto", preset: str = "auto", progress: bool | None = None, log=print,
            recipe: str | None = None) -> dict[str, Any]:
    """export -> calibrate -> build -> correct -> plan, into one bundle. Resumable: a stage whose
    inputs (the sha256 of the files it reads) and settings are unchanged is reused, so a rerun after an
    interruption, or with a new --margin, redoes only what changed. ``force`` reruns everything.

    ``preset`` sets the trajectories of calibrate, correct and plan by model size (``ptqd.budget``);
    explicit ``samples``/``steps``/``correction_samples``/``holdout`` override it. Each stage's time
    and peak resident memory are printed and recorded in the manifest (stage "compile")."""
    import time

    from ptqd import api
    from ptqd.budget import preset_for
    from ptqd.calib.device import resolve_device
    from ptqd.errors import BundleError
    from ptqd.resources import peak_rss_mb, reset_peak
    from ptqd.validate import real

    real("--margin", margin, 0, lo_open=True)  # the plan's options, checked before the stages before it run
    real("--budget", budget, 0, lo_open=True)
    resolve_device(device)  # refuse a missing GPU before any work
    preset_for(preset)  # and an unknown preset
    from ptqd.calib.calibrate import recipe as recipe_options

    recipe_options(recipe or "default")  # and an unknown recipe
    out = Path(out)
    done: dict[str, Any] = {}
    costs: dict[str, Any] = {}

    def stage(name: str, reuse: bool, fn):
        t0 = time.perf_counter()
        if reuse and not force:
            done[name] = "reused"
            costs[name] = {"reused": True}
            log(f"[{len(done)}/5] {name}: reused (inputs unchanged)")
            return
        reset_peak()
        fn()
        done[name] = round(time.perf_counter() - t0, 1)
        peak = peak_rss_mb()
        costs[name] = {"seconds": done[name], "peak_rss_mb": peak}
        log(f"[{len(done)}/5] {name}: done in {done[name]:.0f} s" + (f", peak RSS {peak / 1024:.2f} GB" if peak else ""))

    try:
        b = Bundle.open(out)
        rec = b.stage("export") or {}
        fresh = rec.get("source") == str(model) and rec.get("source_sha256") == api._source_digest(model) \
            and rec.get("source_sha256") is not None
    except BundleError:
        fresh = False
    stage("export", fresh, lambda: api.export(model, out, config=config, progress=progress))
    b = Bundle.open(out)
    pre = preset_for(preset, b.read_json(api.UNET_LAYERS))
    samples = pre.calib_samples if samples is None else samples
    steps = pre.steps if steps is None else steps
    correction_samples = pre.correct_samples if correction_samples is None else correction_samples
    holdout = pre.holdout if holdout is None else holdout
    ccfg = {"samples": samples, "steps": steps, "guidance": guidance, **recipe_options(recipe or "default")}
    stage("calibrate", _reusable(b, "calibrate", (api.UNET_ONNX, api.UNET_LAYERS), config=ccfg),
          lambda: api.calibrate(out, samples=samples, steps=steps, guidance=guidance, device=device, preset=preset,
                                progress=progress, recipe=recipe))
    b = Bundle.open(out)
    built = set((b.stage("build") or {}).get("precisions", []))
    stage("build", _reusable(b, "build", BUILD_INPUTS) and set(precisions) <= built,
          lambda: api.build(out, precisions=tuple(precisions), progress=progress))
    b = Bundle.open(out)
    stage("correct", _reusable(b, "correct", CALIB_FILES, config={"samples": correction_samples, "holdout": holdout}),
          lambda: correct(out, samples=correction_samples, holdout=holdout, device=device, preset=preset,
                          progress=progress))
    b = Bundle.open(out)
    stage("plan", _reusable(b, "plan", (CORRECTION_JSON, "engines/onnxruntime/build.json"), margin=margin,
                            criterion=criterion, budget=budget),
          lambda: plan(out, margin=margin, criterion=criterion, budget=budget, preset=preset))
    with Bundle.transaction(out) as w:
        w.set_stage("compile", {"preset": pre.name, "device": device, "stages": costs})
    b = Bundle.open(out)
    return {"bundle": str(out), "stages": done, "costs": costs, "preset": pre.name,
            "plan": (b.stage("plan") or {}).get("plan"), "bops": bops_table(b)}
