"""``ptqd check``: the regression gate a CI system runs after rebuilding engines.

It recomputes a fixed, seeded set of outputs for every engine (and the plan) and compares them
with a stored baseline:

  eps drift      rel-L2 of each engine's noise prediction vs the baseline's, on seeded inputs at
                 t = 951, 501, 51 (batch 2, real class rows), worst timestep. Limit 2e-2 (1e-1 for
                 4-bit activations): an unchanged engine repeats itself bit for bit on one machine;
                 across CPUs, rounding-tie flips stay far below these (ENGINE_TOLERANCE in api.py),
                 while another precision's engine is off by 0.1-0.3
  sample drift   mean paired PSNR of the end-to-end samples (64, seeded, 20 DDIM steps, decoded)
                 vs the baseline's own samples: >= 30 dB
  PSNR vs FP     mean paired PSNR of those samples vs FP32's: >= baseline - 0.5 dB
  FD             Fréchet distance of the samples to the bundle's real images (when it has a
                 feature model): <= baseline * 1.05 + 1
  class acc      >= baseline - 0.05

The baseline is a JSON file (values and limits, readable and editable: a tightened value is a
stricter gate) plus an NPZ beside it with the arrays, whose sha256 the JSON records. Default
location: the bundle's reports/check_baseline.json. ``--update`` writes a new one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.facts import seeded_unet_inputs
from ptqd.precision import act_bits
from ptqd.runtime.loader import default_labels, open_decoder, sampler_config, step_engines
from ptqd.runtime.pipeline import context_rows, decode, sample_latents
from ptqd.tools.metrics import FeatureModel, class_accuracy, frechet_distance, psnr

CHECK_T = (951, 501, 51)
TOLERANCE = {"eps_drift_a8": 2e-2, "eps_drift_a4": 1e-1, "sample_psnr_vs_baseline": 30.0, "psnr_vs_fp_drop": 0.5,
             "fd_rel": 0.05, "fd_abs": 1.0, "class_acc_drop": 0.05}
DEFAULT_BASELINE = layout.CHECK_BASELINE


def measure(b, num: int = 64, steps: int = 20, seed: int = 0, guidance: float = 3.0) -> dict[str, Any]:
    """Values and arrays for every engine spec of the bundle: {spec: {"values": {...}, "arrays": {...}}}."""
    facts = b.facts
    built = layout.built(b)
    specs = ["fp32"] + sorted(built) + (["auto"] if b.has(layout.PLAN_JSON) else [])
    table = layout.class_embedding(b)
    decoder = open_decoder(b)
    cfg = sampler_config(facts, steps, 0.0, guidance)
    labels = default_labels(facts, None, num)
    fmodel = FeatureModel(b.path(layout.DEMO_FEATURES)) if b.has(layout.DEMO_FEATURES) and decoder is not None else None
    real = fmodel(np.load(b.path(layout.DEMO_REAL))["held_out_images"])[0] if fmodel and b.has(layout.DEMO_REAL) else None
    cache: dict = {}
    out: dict[str, Any] = {}
    fp_images = None
    for spec in specs:
        eng, _ = step_engines(b, spec, "auto", cache=cache)
        arrays: dict[str, np.ndarray] = {}
        if spec != "auto":
            runner = cache.get(spec, eng)
            for i, t in enumerate(CHECK_T):
                f = seeded_unet_inputs(facts, 2, float(t), 100 + i)
                if "context" in f and table is not None:
                    f["context"] = context_rows(table, np.arange(2) % len(table))
                arrays[f"eps_t{t}"] = runner(f["x"], f["t"], f.get("context"))
        lat = sample_latents(eng, facts, table, labels, np.arange(num), seed, cfg)
        imgs = decode(decoder, lat, facts.scale_factor) if decoder is not None else lat
        arrays["samples"] = imgs
        values: dict[str, float] = {}
        if spec == "fp32":
            fp_images = imgs
        elif decoder is not None:
            values["psnr_vs_fp"] = float(np.mean(np.minimum(psnr(imgs, fp_images), 100.0)))
        if fmodel is not None:
            feats, logits = fmodel(imgs)
            if real is not None:
                values["fd"] = frechet_distance(feats, real)
            acc = class_accuracy(logits, labels)
            if acc is not None:
                values["class_acc"] = acc
        out[spec] = {"values": values, "arrays": arrays}
    for r in cache.values():
        r.close()
    return out


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


def compare(now: dict, base: dict, base_arrays) -> list[dict]:
    """One row per (engine, metric): baseline, now, limit, passed."""
    tol = {**TOLERANCE, **base.get("tolerance", {})}
    rows = []

    def row(spec, metric, b_val, n_val, limit, ok, unit=""):
        rows.append({"engine": spec, "metric": metric, "baseline": b_val, "now": n_val, "limit": limit,
                     "passed": bool(ok), "unit": unit})

    for spec, rec in base["engines"].items():
        if spec not in now:
            row(spec, "engine present", "yes", "missing", "present", False)
            continue
        arrays, vals = now[spec]["arrays"], now[spec]["values"]
        eps_keys = sorted(k for k in rec.get("arrays", []) if k.startswith("eps_"))
        if eps_keys:
            drift = max(_rel_l2(arrays[k], base_arrays[f"{spec}/{k}"]) for k in eps_keys)
            lim = tol["eps_drift_a4"] if act_bits(spec) == 4 else tol["eps_drift_a8"]
            row(spec, "eps drift (rel-L2)", 0.0, drift, f"<= {lim:g}", drift <= lim)
        if "samples" in rec.get("arrays", []):

            ref = base_arrays[f"{spec}/samples"]
            if ref.dtype == np.uint8 and arrays["samples"].shape == ref.shape:
                p = float(np.mean(np.minimum(psnr(arrays["samples"], ref), 100.0)))
                lim = tol["sample_psnr_vs_baseline"]
                row(spec, "samples vs baseline (PSNR dB)", 100.0, p, f">= {lim:g}", p >= lim)
        bv = rec["values"]
        if "psnr_vs_fp" in bv:
            lim = bv["psnr_vs_fp"] - tol["psnr_vs_fp_drop"]
            n = vals.get("psnr_vs_fp")
            row(spec, "PSNR vs FP (dB)", bv["psnr_vs_fp"], n, f">= {lim:.2f}", n is not None and n >= lim)
        if "fd" in bv:
            lim = bv["fd"] * (1 + tol["fd_rel"]) + tol["fd_abs"]
            n = vals.get("fd")
            row(spec, "FD", bv["fd"], n, f"<= {lim:.2f}", n is not None and n <= lim)
        if "class_acc" in bv:
            lim = bv["class_acc"] - tol["class_acc_drop"]
            n = vals.get("class_acc")
            row(spec, "class accuracy", bv["class_acc"], n, f">= {lim:.3f}", n is not None and n >= lim)
    return rows


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_baseline(b, now: dict, path: Path | None, config: dict) -> Path:
    """Write JSON + NPZ (to ``path``, or into the bundle's reports/ through a transaction)."""
    from ptqd import __version__

    buf = io.BytesIO()
    np.savez_compressed(buf, **{f"{s}/{k}": v for s, r in now.items() for k, v in r["arrays"].items()})
    npz = buf.getvalue()
    meta = {"ptqd": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": config,
            "tolerance": TOLERANCE, "npz_sha256": hashlib.sha256(npz).hexdigest(),
            "engines": {s: {"values": r["values"], "arrays": sorted(r["arrays"])} for s, r in now.items()}}
    text = json.dumps(meta, indent=2).encode()
    if path is None:
        with Bundle.transaction(b.root) as w:
            w.write_bytes(DEFAULT_BASELINE.replace(".json", ".npz"), npz)
            w.write_bytes(DEFAULT_BASELINE, text)
        return b.root / DEFAULT_BASELINE
    _atomic_write(path.with_suffix(".npz"), npz)
    _atomic_write(path, text)
    return path


def read_baseline(b, path: Path | None):
    if path is None:
        if not b.has(DEFAULT_BASELINE):
            raise UserError(f"{b.root} has no check baseline: run `ptqd check {b.root} --update` once on engines "
                            "you trust (or pass --baseline FILE)")
        meta = b.read_json(DEFAULT_BASELINE)
        arrays = np.load(b.path(DEFAULT_BASELINE.replace(".json", ".npz")))
        return meta, arrays
    if not path.exists():
        raise UserError(f"--baseline {path}: file not found (write one with --update)")
    try:
        meta = json.loads(path.read_text())
        npz = path.with_suffix(".npz")
        if _sha(npz) != meta["npz_sha256"]:
            raise UserError(f"{npz} does not match the checksum recorded in {path}: the baseline arrays changed")
        return meta, np.load(npz)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--baseline {path}: not a ptqd check baseline ({e})") from None


def junit_xml(rows: list[dict], seconds: float) -> str:
    fails = sum(not r["passed"] for r in rows)
    out = ['<?xml version="1.0" encoding="utf-8"?>',
           f'<testsuites><testsuite name="ptqd check" tests="{len(rows)}" failures="{fails}" time="{seconds:.2f}">']
    for r in rows:
        name = quoteattr(r["metric"])
        out.append(f'<testcase classname={quoteattr("ptqd.check." + r["engine"])} name={name}>')
        if not r["passed"]:
            msg = f"{r['metric']}: now {_v(r['now'])}, limit {r['limit']} (baseline {_v(r['baseline'])})"
            out.append(f"<failure message={quoteattr(msg)}/>")
        out.append("</testcase>")
    out.append("</testsuite></testsuites>")
    return "\n".join(out) + "\n"


def _v(x) -> str:
    return x if isinstance(x, str) else "-" if x is None else f"{x:.4g}"


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'engine':<10}{'metric':<32}{'baseline':>10}{'now':>10}  {'limit':<12}status"]
    for r in rows:
        lines.append(f"{r['engine']:<10}{r['metric']:<32}{_v(r['baseline']):>10}{_v(r['now']):>10}  "
                     f"{r['limit']:<12}{'ok' if r['passed'] else 'REGRESSION'}")
    return "\n".join(lines)


@writes_bundle(when="update")
def check(bundle, baseline: str | os.PathLike | None = None, update: bool = False,
          junit: str | os.PathLike | None = None, num: int = 64, steps: int = 20) -> dict[str, Any]:
    """Run the gate. Returns {"passed", "rows", "baseline"}; with ``update`` writes the baseline instead."""

    t0 = time.perf_counter()
    b = Bundle.open(bundle)
    path = Path(baseline) if baseline else None
    config = {"num": num, "steps": steps, "seed": 0, "guidance": 3.0, "timesteps": list(CHECK_T)}
    if not update:
        meta, arrays = read_baseline(b, path)
        config = meta.get("config", config)
    now = measure(b, num=config["num"], steps=config["steps"], seed=config["seed"], guidance=config["guidance"])
    if update:
        where = write_baseline(b, now, path, config)
        return {"passed": True, "updated": str(where), "rows": [],
                "engines": {s: r["values"] for s, r in now.items()}}
    rows = compare(now, meta, arrays)
    res = {"passed": all(r["passed"] for r in rows), "rows": rows, "baseline": str(path or b.root / DEFAULT_BASELINE),
           "baseline_created": meta.get("created"), "seconds": round(time.perf_counter() - t0, 1)}
    if junit:
        _atomic_write(Path(junit), junit_xml(rows, res["seconds"]).encode())
    return res
