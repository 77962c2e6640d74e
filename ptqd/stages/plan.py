"""``ptqd plan``: the step-aware mixed-precision plan (PTQD's SNR rule, or measured damage under a BOPs
budget), and the BOPs of precisions and plans."""

from __future__ import annotations

from typing import Any

from ptqd.calib.bops import bops, layer_bits
from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.precision import CALIBRATED_NAMES, PEER, PEER_NAMES
from ptqd.progress import progress_bar
from ptqd.runtime.loader import default_labels, load_plan, open_engine
from ptqd.stages.common import correction_sampler_config, digest


def precision_bops(b: Bundle, precision: str, rows: list[dict] | None = None) -> float:
    """BOPs per forward of one precision: the calibrated layers when there are, else the default selection."""
    rows = rows if rows is not None else layout.layer_rows(b)
    calibrated = layout.calib_layer_meta(b, precision) if precision in CALIBRATED_NAMES else None
    return bops(rows, layer_bits(rows, precision, calibrated))


def bops_table(b: Bundle) -> dict[str, Any]:
    """BOPs per forward for FP32 and each precision (built or not), and for the plan summed over its steps."""

    if not b.has(layout.UNET_LAYERS):
        return {}
    rows = layout.layer_rows(b)
    fp = precision_bops(b, "fp32", rows)
    out: dict[str, Any] = {"fp32": fp, "precisions": {}}
    peers = {PEER.value: "quantize_static: every conv/linear", "nncf-int8": "NNCF: every conv/linear",
             "nncf-mixed": "NNCF: every conv/linear", "nncf-hybrid": "NNCF hybrid: convs; linear layers weight-only"}
    ov_built = layout.built(b, "openvino")
    for p in CALIBRATED_NAMES + tuple(q for q in PEER_NAMES if q == PEER.value or q in ov_built):
        v = precision_bops(b, p, rows)
        out["precisions"][p] = {"bops": v, "saving_vs_fp32": fp / v,
                                "source": "calibrated layers" if p in CALIBRATED_NAMES and layout.calib_layer_meta(b, p) else
                                peers.get(p, "default layer selection")}
    if b.has(layout.PLAN_JSON):
        plan = b.read_json(layout.PLAN_JSON)
        per = {p: precision_bops(b, p, rows) for p in {s["precision"] for s in plan["steps"]}}
        total = sum(per[s["precision"]] for s in plan["steps"])
        n = len(plan["steps"])
        out["plan"] = {"bops_per_sample": total, "steps": n, "mean_bops_per_forward": total / n,
                       "saving_vs_fp32": fp * n / total,
                       "precisions": {p: sum(s["precision"] == p for s in plan["steps"]) for p in sorted(per)}}
    return out


def plan_bops(b: Bundle, spec: str, steps: int, cfg=None) -> float:
    """Mean BOPs per forward of a precision or plan over the UNet calls of the sampler (``cfg``, a
    SamplerConfig; default DDIM on CompVis spacing) at ``steps``."""
    from ptqd.runtime.pipeline import scheduler_for
    from ptqd.runtime.sampler import SamplerConfig

    if spec != "auto" and not spec.endswith(".json"):
        return precision_bops(b, spec)
    pl = load_plan(b, spec)
    ts = scheduler_for(b.facts, cfg if cfg is not None else SamplerConfig(steps=steps)).timesteps
    cost = {p: precision_bops(b, p) for p in pl.precisions}
    return sum(cost[pl.at(float(t))] for t in ts) / len(ts)


def measure_damage(b: Bundle, candidates, reference: str, samples: int = 64, seed: int = 2,
                   progress: bool | None = None) -> dict[str, Any]:
    """For every step i and precision p: how much the final latents move away from FP's when step i
    alone runs p instead of ``reference`` (mean squared difference, same noise), with the PTQD
    correction on. Runs the built ONNX Runtime engines on the calibrated steps and guidance, on the
    sampler the correction was fitted on (``correction_sampler_config``); a step is a distinct
    timestep (PNDM's repeated one counts once).

    The steps before i are the reference's own, so on DDIM each variant resumes from the reference
    trajectory's x at step i: S(S+1)/2 engine steps per precision instead of S² (multistep samplers keep
    history: each variant runs whole)."""
    import numpy as np

    from ptqd.calib.correction import resumable, trajectory_timesteps
    from ptqd.runtime.correction import CORRECTION_PARTS, CorrectionTable, Plan, StepEngines
    from ptqd.runtime.pipeline import sample_latents

    facts = b.facts
    cfg = correction_sampler_config(b)
    ts = trajectory_timesteps(facts, cfg)
    resume = resumable(cfg)
    table = layout.class_embedding(b)
    labels, idx = default_labels(facts, None, samples), np.arange(samples)
    fitted = b.read_json(layout.CORRECTION_JSON)["precisions"]
    tables = {p: CorrectionTable.from_json(fitted[p], applied=True) for p in candidates if p in fitted}
    # at most two engines open at once (FP32 first, then the reference and one candidate): on SDXL's UNet the
    # FP32 graph and three engines together passed 23 GiB
    with open_engine(b, "fp32", allow_spinning=False) as fp_runner:
        fp = sample_latents(fp_runner, facts, table, labels, idx, seed, cfg)
    runners = {reference: open_engine(b, reference, allow_spinning=False)}
    states: list[np.ndarray] = []  # the reference trajectory's x before each step

    def keep(i, t, x, ctx, eps):
        states.append(x.copy())

    ref = StepEngines(runners, Plan(ts, [reference] * len(ts)), tables, CORRECTION_PARTS)
    base = float(np.mean((sample_latents(ref, facts, table, labels, idx, seed, cfg,
                                         observe=keep if resume else None) - fp) ** 2))
    damage = {}
    others = [p for p in candidates if p != reference]
    with progress_bar(len(others) * len(ts), "plan", progress) as bar:
        for p in others:
            damage[p] = []
            bar.set_postfix_str(f"damage of {p} per step, {samples} samples")
            runners[p] = open_engine(b, p, allow_spinning=False)
            for i in range(len(ts)):
                eng = StepEngines(runners, Plan(ts, [p if j == i else reference for j in range(len(ts))]), tables,
                                  CORRECTION_PARTS)
                x0 = sample_latents(eng, facts, table, labels, idx, seed, cfg,
                                    start=(i, states[i]) if resume else None)
                damage[p].append(float(np.mean((x0 - fp) ** 2)) - base)
                bar.update()
            runners.pop(p).close()
    runners[reference].close()
    return {"reference_error": base, "damage": damage, "samples": samples, "seed": seed, "timesteps": ts}


@writes_bundle()
def plan(bundle, margin: float = 1.0, precisions=None, criterion: str = "sensitivity", budget: float = 0.9,
         reference: str = "w4a8", samples: int | None = None, preset: str = "auto",
         progress: bool | None = None) -> dict[str, Any]:
    """Step-aware mixed precision from the fitted correction: write calib/plan.json (with the curves).

    ``criterion``: "snr" (PTQD: cheapest precision whose corrected SNR_Q clears margin·SNR_F) or
    "sensitivity" (default: measured damage of each step's precision on the final samples, cheapest
    plan set under ``budget`` × the BOPs of ``reference``; see ``budget_plan``)."""
    from ptqd.calib.correction import budget_plan, make_plan

    b = Bundle.open(bundle)
    if not b.has(layout.CORRECTION_JSON):
        raise UserError(f"{b.root} has no fitted correction: run `ptqd correct {b.root}` first")
    from ptqd.validate import real

    real("--margin", margin, 0, lo_open=True)
    real("--budget", budget, 0, lo_open=True)
    if criterion not in ("snr", "sensitivity"):
        raise UserError(f"--criterion must be snr or sensitivity, got {criterion!r}")
    if not 0 < budget:
        raise UserError(f"--budget must be > 0 (a multiple of the reference's BOPs), got {budget}")
    corr = b.read_json(layout.CORRECTION_JSON)["precisions"]
    built = layout.built(b)
    cands = [p for p in (precisions or corr) if p in corr and p in built]
    if not cands:
        raise UserError(f"no precision has both a fitted correction and a built engine in {b.root}: "
                        f"run `ptqd build {b.root}`")
    cost = {p: precision_bops(b, p) for p in cands}
    rec = make_plan({p: corr[p] for p in cands}, cost, b.facts.schedule.alphas_cumprod, margin)
    if criterion == "sensitivity":
        if reference not in cands:
            raise UserError(f"--reference {reference} has no engine and correction; choose from {', '.join(cands)}")
        from ptqd.budget import preset_for

        if min(cost.values()) > budget * cost[reference] * (1 + 1e-9):  # before minutes of measuring, not after
            cheaper = [p for p in corr if p not in cands and precision_bops(b, p) <= budget * cost[reference]]
            unbuilt = [p for p in cheaper if p not in built]
            fixes = [f"add {p} to --precisions" for p in cheaper if p in built]
            if unbuilt:
                fixes.append(f"build {','.join(unbuilt)} (`ptqd build {b.root} --precisions {','.join(unbuilt)}`)")
            raise UserError(f"no plan fits --budget {budget:g} x {reference}'s BOPs with the engines built "
                            f"({', '.join(cands)}): {''.join(f + ', or ' for f in fixes)}raise --budget to at least "
                            f"{min(cost.values()) / cost[reference]:.3g}")
        if samples is None:
            samples = preset_for(preset, b.read_json(layout.UNET_LAYERS)).plan_samples
        from ptqd.calib.correction import trajectory_timesteps

        visits = trajectory_timesteps(b.facts, correction_sampler_config(b))
        if [float(t) for t in visits] != [float(s["t"]) for s in rec["steps"]]:
            raise UserError(f"{b.root}'s correction was fitted at other timesteps than its sampler visits now (a "
                            f"correction.json from an older ptqd, fitted on DDIM): run `ptqd correct {b.root}` again")
        meas = measure_damage(b, cands, reference, samples, progress=progress)
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
    rec["correction_gate"] = gate_plan_correction(b, rec)
    with Bundle.transaction(b.root) as w:
        w.write_json(layout.PLAN_JSON, rec)
        w.set_stage("plan", {"margin": margin, "criterion": criterion, "budget": budget, "reference": reference,
                             "precisions": cands, "inputs": digest(b, layout.PLAN_INPUTS),
                             "plan": [s["precision"] for s in rec["steps"]]})
    return rec


def gate_plan_correction(b: Bundle, rec: dict) -> dict:
    """Does the plan with each precision's gated correction beat the plan uncorrected on the gate's
    held-out samples (``calib.gate.gate_plan``)? If not, ``--plan auto --correction auto`` runs it
    uncorrected."""
    from ptqd.calib.gate import gate_plan
    from ptqd.runtime.correction import CORRECTION_PARTS, CorrectionTable, Plan, StepEngines

    corr = b.read_json(layout.CORRECTION_JSON)
    g = corr.get("config", {}).get("gate")
    pl = Plan.from_json(rec)
    fitted = corr["precisions"]
    tables = {p: CorrectionTable.from_json(fitted[p], applied=True) for p in pl.precisions if p in fitted}
    used = any(tables[p].parts[list(tables[p].t).index(t)] for t, p in zip(pl.t, pl.precision)
               if p in tables and t in tables[p].t)
    if not g or not used:
        return {"helps": bool(used), "note": "no gate record" if not g else "the gated parts never run in this plan"}
    cfg = correction_sampler_config(b)
    runners = {p: open_engine(b, p, allow_spinning=False) for p in ["fp32", *pl.precisions]}
    try:
        return gate_plan(StepEngines(runners, pl, tables, CORRECTION_PARTS), StepEngines(runners, pl, {}, ()),
                         runners["fp32"], b.facts, layout.class_embedding(b),
                         default_labels(b.facts, None, g["samples"]), g["seed"], cfg)
    finally:
        for r in runners.values():
            r.close()
