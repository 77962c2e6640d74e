"""``ptqd eval``: quality of engines and plans against FP on the same seeds and classes, and PTQD's
ablation (each part of the correction on and off). Uses the public runtime like a user would."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.precision import CALIBRATED_NAMES
from ptqd.progress import progress_bar
from ptqd.runtime.loader import (default_labels, load_plan, open_decoder, open_engine, resolve_backend,
                                 sampler_config, step_engines)
from ptqd.stages.plan import plan_bops, precision_bops
from ptqd.tools.metrics import FeatureModel, evaluate_runners, frechet_distance
from ptqd.validate import sampling_counts


@writes_bundle(when="write_report")
def evaluate(bundle, precisions=("fp32",), num: int = 500, seed: int = 0, steps: int = 20, eta: float = 0.0,
             guidance: float = 3.0, classes=None, features: str | os.PathLike | None = None, batch: int = 100,
             progress: bool | None = None, write_report: bool = True, correction: str | tuple = "auto",
             rows: list[tuple[str, str | tuple]] | None = None, report_name: str = "eval",
             vsc_direction: str = "sigma", eps_mse: bool = True, backend: str = "auto",
             sampler: str = "auto") -> dict[str, Any]:
    """Quality rows for ``precisions`` (engines, ``auto`` for the plan, or plan files) against FP (always
    the first row) on the same seeds and classes. ``correction`` applies to every row; ``rows``, a list
    of (precision, correction) pairs, replaces ``precisions`` for mixed settings (the ablation). ``backend``
    runs the quantized rows (onnxruntime or openvino); the FP32 reference is always ONNX Runtime's. ``sampler``:
    ``auto`` (the bundle's own) or a sampler name, for every row."""
    sampling_counts(num=num, batch=batch, seed=seed)
    b = Bundle.open(bundle)
    facts = b.facts
    wanted = [p for p, _ in rows] if rows is not None else list(precisions)
    backend = resolve_backend(b, backend, log=lambda m: print(m, file=sys.stderr),
                              needs=sorted({q for p in wanted for q in load_plan(b, p).precisions}))
    fp_runner = open_engine(b, "fp32", allow_spinning=False)
    decoder, table = open_decoder(b), layout.class_embedding(b)
    cfg = dataclasses.replace(sampler_config(facts, steps, eta, guidance, sampler), vsc_direction=vsc_direction)
    cfg.validate(facts.schedule.num_train_timesteps)
    labels = default_labels(facts, list(classes) if classes else None, num)
    runners, specs, cache = {"fp32": fp_runner}, {"fp32": "fp32"}, {}
    for p, corr in rows if rows is not None else [(p, correction) for p in precisions]:
        if p == "fp32" and corr in ("auto", "off"):
            continue
        eng, label = step_engines(b, p, corr, cache=cache, backend=backend)
        runners[label], specs[label] = eng, p
    feat_path = Path(features) if features else (b.path(layout.DEMO_FEATURES) if b.has(layout.DEMO_FEATURES) else None)
    if feat_path is not None and not feat_path.exists():
        raise UserError(f"--features {feat_path}: file not found")
    fmodel = FeatureModel(feat_path) if feat_path is not None else None
    rf = None
    reference: dict[str, Any] = {}
    if b.has(layout.DEMO_REAL) and fmodel is not None:
        data = np.load(b.path(layout.DEMO_REAL))
        real = data["held_out_images"]
        rf, real_logits = fmodel(real)
        train_f = fmodel(data["train_images"])[0]
        rng = np.random.RandomState(seed)
        allf = np.concatenate([train_f, rf])
        perm = rng.permutation(len(allf))
        half = len(allf) // 2
        reference = {
            "fd_real_half_vs_half": frechet_distance(allf[perm[:half]], allf[perm[half:]]),
            "fd_real_train_vs_held_out": frechet_distance(train_f[rng.choice(len(train_f), min(num, len(train_f)),
                                                                           replace=False)], rf),
            "held_out_images": int(len(real)),
            "classifier_acc_held_out": float((real_logits.argmax(1) == data["held_out_labels"]).mean()),
        }
    with progress_bar(num, report_name, progress) as bar:
        res = evaluate_runners(facts, table, runners, decoder, labels, seed, cfg, batch=batch, features=fmodel,
                               real_features=rf, progress=bar, eps_mse=eps_mse)
    res.reference = reference
    fp_bops = precision_bops(b, "fp32") if b.has(layout.UNET_LAYERS) else None
    for row in res.rows:
        spec = specs[row["precision"]]
        if fp_bops and (spec in ("fp32", "auto", "ort-int8") or spec in CALIBRATED_NAMES or spec.endswith(".json")):
            v = plan_bops(b, spec, cfg.steps, cfg)
            row["bops_per_forward"] = v
            row["bops_saving"] = fp_bops / v
    report = res.to_json()
    report["backend"] = str(backend)
    if write_report:
        with Bundle.transaction(b.root) as w:
            w.write_json(layout.report(report_name), report)
    for r in cache.values():
        r.close()
    return report


def ablation(bundle, precisions=("w4a8", "w4a4", "auto"), num: int = 500, seed: int = 0, steps: int = 20,
             guidance: float = 3.0, batch: int = 100, progress: bool | None = None) -> dict[str, Any]:
    """PTQD's ablation on one bundle, paired with FP on the same seeds: at η = 0 the uncorrected engine,
    + correlated correction (k), + bias; at η = 1 the uncorrected engine, + k + bias, + VSC."""
    rows0 = [(p, c) for p in precisions for c in ("off", ("k",), ("k", "bias"))]
    rows1 = [(p, c) for p in precisions for c in ("off", ("k", "bias"), ("k", "bias", "vsc"))]
    out = {}
    for eta, rows in ((0.0, rows0), (1.0, rows1)):
        out[f"eta{eta:g}"] = evaluate(bundle, num=num, seed=seed, steps=steps, eta=eta, guidance=guidance,
                                      batch=batch, progress=progress, rows=rows, report_name=f"ablation_eta{eta:g}",
                                      sampler=None)  # PTQD's DDIM (η 0 and 1), on which the correction was fit
    return out
