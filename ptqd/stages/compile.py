"""``ptqd compile``: export -> calibrate -> build -> correct -> plan into one bundle, resumably."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.precision import CALIBRATED_NAMES
from ptqd.stages.build import build
from ptqd.stages.calibrate import calibrate
from ptqd.stages.common import check_sampler_option, fit_sampler_config, reusable, source_bytes, source_digest
from ptqd.stages.correct import check_gate_options, correct, gate_config
from ptqd.stages.export import export
from ptqd.stages.plan import bops_table, plan


def outlier_settings(mode: str, rank_budget: float, layer_share: float) -> dict | None:
    """The ``--outliers`` settings that decide an export (None: no rewrite)."""
    return None if mode == "none" else {"mode": mode, "rank_budget": rank_budget, "layer_share": layer_share}


def exported_outliers(rec: dict) -> dict | None:
    """The ``--outliers`` settings an export record was made with (None: no rewrite; records from before
    ``--outlier-layers`` rewrote every layer)."""
    o = rec.get("outliers")
    return outlier_settings(o["mode"], o["rank_budget"], o.get("layer_share", 1.0)) if o else None


@writes_bundle("out", create=True)
def compile(model, out, config=None, precisions=CALIBRATED_NAMES, samples: int | None = None, steps: int | None = None,
            guidance: float = 3.0, correction_samples: int | None = None, holdout: int | None = None,
            margin: float = 1.0, criterion: str = "sensitivity", budget: float = 0.9, force: bool = False,
            device: str = "auto", preset: str = "auto", progress: bool | None = None, log=print,
            prompts=None, recipe: str | None = None, gate_samples: int | None = None,
            gate_ranges: int | None = None, gate_budget: float | None = None,
            backend: str = "onnxruntime", cluster=None, weight_grid: str = "portable",
            sampler: str = "auto", attention: str = "float", outliers: str = "none",
            rank_budget: float = 0.05, outlier_layers: float = 1.0) -> dict[str, Any]:
    """export -> calibrate -> build -> correct -> plan, into one bundle. ``cluster``: calibrate's and correct's FP
    trajectories run on Ray workers (:mod:`ptqd.cluster`). Resumable: a stage whose
    inputs (the sha256 of the files it reads) and settings are unchanged is reused, so a rerun after an
    interruption, or with a new --margin, redoes only what changed. ``force`` reruns everything.

    ``preset`` sets the trajectories of calibrate, correct and plan by model size (``ptqd.budget``);
    explicit ``samples``/``steps``/``correction_samples``/``holdout`` override it. Each stage's time
    and peak resident memory are printed and recorded in the manifest (stage "compile").

    ``sampler``: what the correction, its gate and the plan are fitted on (auto: the bundle's own; see
    ``ptqd.stages.common.fit_sampler_config``).

    ``backend="auto"``: after the plan, OpenVINO's engines too (where openvino is installed) and a short timing
    that records the faster backend for sampling (``ptqd.stages.choose``); calibration, correction and the
    plan always run on ONNX Runtime's engines."""
    if backend not in ("onnxruntime", "auto"):
        raise UserError(f"--backend must be onnxruntime or auto for compile, got {backend!r} (build other backends "
                        "with `ptqd build BUNDLE --backend NAME` afterwards)")
    import time

    from ptqd import memory
    from ptqd.budget import GATE_CANDIDATES, preset_for
    from ptqd.calib.device import resolve_device
    from ptqd.errors import BundleError
    from ptqd.precision import ORT_BUILDABLE, Precision
    from ptqd.resources import TreePeak
    from ptqd.stages.build import plan_precisions
    from ptqd.validate import real

    real("--margin", margin, 0, lo_open=True)  # the plan's options, checked before the stages before it run
    real("--budget", budget, 0, lo_open=True)
    check_gate_options(gate_samples, gate_ranges, gate_budget)
    check_sampler_option(sampler)
    resolve_device(device)  # refuse a missing GPU before any work
    preset_for(preset)  # and an unknown preset
    from ptqd.calib.calibrate import recipe as recipe_options

    recipe_options(recipe or "default")  # and an unknown recipe
    from ptqd.calib.calibrate import reduce_range_for

    reduce_range = reduce_range_for(weight_grid)  # and an unknown weight grid
    from ptqd.calib.attention import check_mode

    check_mode(attention)
    from ptqd.calib.outliers import check_mode as check_outliers

    check_outliers(outliers, rank_budget, outlier_layers)
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
        with TreePeak() as watch:  # the whole process tree, polled, and this process's own high-water mark
            fn()
        done[name] = round(time.perf_counter() - t0, 1)
        peak = watch.peak_mb
        costs[name] = {"seconds": done[name], "peak_rss_mb": peak}
        log(f"[{len(done)}/5] {name}: done in {done[name]:.0f} s" + (f", peak RSS {peak / 1024:.2f} GiB" if peak else ""))

    try:
        b = Bundle.open(out)
        rec = b.stage("export") or {}
        fresh = rec.get("source") == str(model) and rec.get("source_sha256") == source_digest(model) \
            and rec.get("source_sha256") is not None and exported_outliers(rec) == \
            outlier_settings(outliers, rank_budget, outlier_layers)
    except BundleError:
        fresh = False
    if prompts is not None:  # text-to-image: new calibration prompts mean a new export (their encoded table)
        from ptqd.runtime.text import read_prompts

        prompts = read_prompts(prompts) if isinstance(prompts, (str, Path)) else list(prompts)
        fresh = fresh and rec.get("prompts") == prompts
    precisions = tuple(Precision.parse(p, ORT_BUILDABLE) for p in precisions)
    if not fresh:
        memory.require("export", memory.export_peak(source_bytes(model)),
                       "free memory (other jobs), or export on a machine with more")
    stage("export", fresh, lambda: export(model, out, config=config, progress=progress, prompts=prompts,
                                         outliers=outliers, rank_budget=rank_budget, outlier_layers=outlier_layers))
    b = Bundle.open(out)
    pre = preset_for(preset, b.read_json(layout.UNET_LAYERS))
    samples = pre.calib_samples if samples is None else samples
    steps = pre.steps if steps is None else steps
    correction_samples = pre.correct_samples if correction_samples is None else correction_samples
    holdout = pre.holdout if holdout is None else holdout
    # know before you die: every remaining stage's peak against the memory available, before the long ones
    # run; the ort-int8 peer is left out (one line) where it alone would not fit
    cost = memory.ModelCost.from_bundle(b)
    for name in ("calibrate", "correct", "plan"):
        memory.require_stage(name, cost, replace(pre, calib_batch=min(pre.calib_batch, samples),
                                                 correct_batch=min(pre.correct_batch, correction_samples)))
    precisions, _ = plan_precisions(b, precisions, log)
    precisions = tuple(p.value for p in precisions)
    ccfg = {"samples": samples, "steps": steps, "guidance": guidance, "reduce_range": reduce_range,
            "attention": attention, **recipe_options(recipe or "default")}
    stage("calibrate", reusable(b, "calibrate", (layout.UNET_ONNX, layout.UNET_LAYERS), config=ccfg),
          lambda: calibrate(out, samples=samples, steps=steps, guidance=guidance, device=device, preset=preset,
                                progress=progress, recipe=recipe, cluster=cluster, weight_grid=weight_grid,
                                attention=attention))
    b = Bundle.open(out)
    built = set((b.stage("build") or {}).get("precisions", []))
    same = reusable(b, "build", layout.BUILD_INPUTS) and not force
    todo = tuple(p for p in precisions if not (same and p in built))
    if todo and set(precisions) - set(todo):  # an interrupted build committed these before it stopped
        log(f"build: {', '.join(p for p in precisions if p not in todo)} kept from an earlier run; building "
            f"{', '.join(todo)}")
    stage("build", not todo, lambda: build(out, precisions=todo, progress=progress, log=log))
    b = Bundle.open(out)
    gate_cfg = gate_config(pre, correction_samples, gate_samples, gate_ranges, gate_budget)
    old_gate = ((b.stage("correct") or {}).get("config") or {}).get("gate") or {"samples": 0}
    old_gate = {"candidates": ["+".join(c) for c in GATE_CANDIDATES], "ranges": 0, "budget_s": 0.0,
                **old_gate}  # older records (no budget: the preset's whole gate)
    same_gate = {k: old_gate[k] for k in gate_cfg} == gate_cfg or gate_cfg["samples"] == old_gate["samples"] == 0
    cal = b.stage("calibrate")["config"]
    fit_on = fit_sampler_config(b.facts, cal["steps"], cal["eta"], cal["guidance"], sampler).sampler_name
    same_sampler = ((b.stage("correct") or {}).get("config") or {}).get("sampler", "ddim") == fit_on  # older: DDIM
    stage("correct", same_gate and same_sampler and reusable(b, "correct", layout.CALIB_FILES,
                                                             config={"samples": correction_samples,
                                                                     "holdout": holdout}),
          lambda: correct(out, samples=correction_samples, holdout=holdout, device=device, preset=preset,
                          progress=progress, gate_samples=gate_cfg["samples"], gate_ranges=gate_cfg["ranges"],
                          gate_budget=gate_cfg["budget_s"], log=log, cluster=cluster, sampler=sampler))
    b = Bundle.open(out)
    stage("plan", reusable(b, "plan", layout.PLAN_INPUTS, margin=margin,
                            criterion=criterion, budget=budget),
          lambda: plan(out, margin=margin, criterion=criterion, budget=budget, preset=preset, progress=progress))
    if backend == "auto":
        import importlib.util

        from ptqd.stages.choose import choose_backend

        t0 = time.perf_counter()
        with TreePeak() as watch:
            if importlib.util.find_spec("openvino") is not None:
                build(out, backend="openvino", progress=progress, log=log)
            else:
                log("backend auto: openvino is not installed, so only ONNX Runtime is a candidate "
                    "(pip install openvino)")
            choose_backend(out, log=log)
        costs["backend_auto"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": watch.peak_mb}
        log(f"backend auto: OpenVINO engines and the timing in {costs['backend_auto']['seconds']:.0f} s"
            + (f", peak RSS {watch.peak_mb / 1024:.2f} GiB" if watch.peak_mb else ""))
    with Bundle.transaction(out) as w:
        w.set_stage("compile", {"preset": pre.name, "device": device, "stages": costs})
    b = Bundle.open(out)
    return {"bundle": str(out), "stages": done, "costs": costs, "preset": pre.name,
            "plan": (b.stage("plan") or {}).get("plan"), "bops": bops_table(b)}
