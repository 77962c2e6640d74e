"""The Python API: one function per stage. The CLI is a thin shell over these."""
# PTQD's stages after the engines live in ptqd.compiler and are re-exported here (see the end).

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from ptqd.bundle import Bundle, writes_bundle
from ptqd.errors import UserError
from ptqd.facts import NoiseSchedule

UNET_ONNX = "unet.onnx"
UNET_LAYERS = "unet.layers.json"
FIRST_STAGE_ONNX = "first_stage.onnx"
CLASS_EMBEDDING = "cond/class_embedding.npy"
EXPORT_REPORT = "reports/export_validation.json"


def _progress(total: int, desc: str, enabled: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=(None if enabled is None else not enabled),
                bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix}")


def parse_schedule(spec: str) -> NoiseSchedule:
    """``KIND:BETA_START:BETA_END:T`` (e.g. ``scaled_linear:0.0015:0.0195:1000``) -> NoiseSchedule."""
    try:
        kind, start, end, T = spec.split(":")
        return NoiseSchedule(kind, int(T), float(start), float(end))
    except ValueError as e:
        raise UserError(f"--schedule {spec!r}: expected KIND:BETA_START:BETA_END:T with KIND linear or "
                        f"scaled_linear, e.g. scaled_linear:0.0015:0.0195:1000 ({e})") from None


@writes_bundle("out", create=True)
def export(model: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | dict | None = None,
           schedule: NoiseSchedule | None = None, first_stage: bool = True, validate: bool = True,
           opset: int = 18, exporter: str = "torchscript", progress: bool | None = None) -> dict[str, Any]:
    """Export ``model`` to a new bundle at ``out``: FP32 UNet ONNX + layer table (+ decoder).

    The bundle at ``out`` is replaced only if every step, validation included, succeeds.
    Returns the export record written to the manifest.
    """
    import numpy as np

    from ptqd.exporter import ExportConfig, export_first_stage, export_unet, validate_first_stage, validate_unet
    from ptqd.exporter.layers import build_layer_table
    from ptqd.facts import seeded_unet_inputs
    from ptqd.models import load_model

    ecfg = ExportConfig(opset=opset, exporter=exporter)
    try:
        ecfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    steps = 3 + int(validate) + 2 * int(first_stage)
    with _progress(steps, "export", progress) as bar:
        bar.set_postfix_str("loading model")
        loaded = load_model(model, config=config, schedule=schedule, with_first_stage=first_stage)
        bar.update()
        record: dict[str, Any] = {"source": str(model), "source_sha256": _source_digest(model), "opset": opset,
                                  "exporter": exporter, "inputs": ["x", "t"]}
        with Bundle.transaction(out, create=True) as w:
            bar.set_postfix_str("exporting UNet")
            path = w.file(UNET_ONNX)
            for extra in export_unet(loaded, path, ecfg)[1:]:
                w.declare(extra.name)
            bar.update()
            if loaded.class_embedding is not None:
                buf = io.BytesIO()
                np.save(buf, loaded.class_embedding.astype(np.float32))
                w.write_bytes(CLASS_EMBEDDING, buf.getvalue())
                record["inputs"].append("context")
            reports: dict[str, Any] = {}
            if validate:
                bar.set_postfix_str("validating UNet vs torch")
                reports["unet"] = validate_unet(loaded, path, class_rows=loaded.class_embedding)
                bar.update()
            bar.set_postfix_str("layer table")
            feeds = seeded_unet_inputs(loaded.facts, 1, 500.0, 0)
            w.write_json(UNET_LAYERS, build_layer_table(path, feeds))
            bar.update()
            if first_stage and loaded.first_stage is not None:
                bar.set_postfix_str("exporting decoder")
                fpath = w.file(FIRST_STAGE_ONNX)
                for extra in export_first_stage(loaded, fpath, ecfg)[1:]:
                    w.declare(extra.name)
                bar.update()
                if validate:
                    bar.set_postfix_str("validating decoder")
                    reports["first_stage"] = validate_first_stage(loaded, fpath)
                bar.update()
            elif first_stage:
                bar.update(2)
            record["first_stage"] = first_stage and loaded.first_stage is not None
            record["validation"] = {k: {"worst_abs_error": v["worst_abs_error"], "passed": v["passed"]}
                                    for k, v in reports.items()}
            if reports:
                w.write_json(EXPORT_REPORT, reports)
            if loaded.facts.family == "demo":
                _write_demo_eval_assets(w)
            w.set_model(loaded.facts.to_json())
            w.set_stage("export", record)
        bar.set_postfix_str("done")
    return record


def _source_digest(model) -> str | None:
    """sha256 of the weights file the bundle was exported from (so `demo` can tell a stale bundle)."""
    from ptqd.bundle import sha256_file

    if str(model) == "demo":
        from ptqd.models.demo import demo_dir

        return sha256_file(demo_dir() / "demo_ldm.safetensors")
    p = Path(model)
    return sha256_file(p) if p.is_file() else None


def inspect(bundle: str | os.PathLike) -> dict[str, Any]:
    """Model facts, MACs per forward (total and by kind), layer counts and file sizes; verifies checksums."""
    b = Bundle.open(bundle)
    b.verify_all()
    facts = b.facts
    info: dict[str, Any] = {
        "bundle": str(b.root),
        "schema_version": b.manifest["schema_version"],
        "producer": b.manifest.get("producer", {}),
        "model": facts.to_json(),
        "stages": sorted(b.manifest.get("stages", {})),
        "files": {rel: rec["size"] for rel, rec in sorted(b.files.items())},
        "total_bytes": sum(rec["size"] for rec in b.files.values()),
    }
    info["model"]["schedule"].pop("betas_explicit", None)
    if b.has(UNET_LAYERS):
        table = b.read_json(UNET_LAYERS)
        info["macs_per_forward"] = table["macs_per_forward"]
        info["macs_by_kind"] = table["macs_by_kind"]
        info["layer_count"] = table["layer_count"]
        info["weight_params"] = sum(math.prod(r["weight_shape"]) for r in table["layers"]
                                    if r["weight_shape"])
    export = b.stage("export")
    if export:
        info["export"] = export
    info["bops"] = bops_table(b)
    return info


def _write_demo_eval_assets(w) -> None:
    """The demo's evaluator travels in its bundle: digit classifier (features) and the real digits."""
    import numpy as np

    from ptqd.evaluate import DEMO_FEATURES, DEMO_REAL
    from ptqd.models.demo import demo_dir, digits
    from ptqd.runtime.pipeline import to_uint8

    w.write_bytes(DEMO_FEATURES, (demo_dir() / "digit_classifier.onnx").read_bytes())
    xtr, ytr, xte, yte = digits()
    buf = io.BytesIO()
    np.savez_compressed(buf, train_images=to_uint8(xtr), train_labels=ytr, held_out_images=to_uint8(xte),
                        held_out_labels=yte)
    w.write_bytes(DEMO_REAL, buf.getvalue())


BUILD_JSON = "engines/onnxruntime/build.json"


def open_engine(b: Bundle, precision: str = "fp32", threads: int | None = None, allow_spinning: bool = True,
                backend: str = "onnxruntime"):
    """A runner for ``precision``: the exported graph for fp32, else the built engine (one per
    timestep bucket when the calibration has several). ``backend="tensorrt"``: the TensorRT plan."""
    from ptqd.runtime.runners import BucketedRunner, OrtRunner

    if backend == "tensorrt":
        from ptqd.tensorrt_backend import open_tensorrt_runner

        return open_tensorrt_runner(b, precision)

    if precision == "fp32":
        return OrtRunner(b.path(UNET_ONNX), threads, allow_spinning)
    built = b.read_json(BUILD_JSON) if b.has(BUILD_JSON) else {}
    if precision not in built:
        raise UserError(f"{b.root} has no {precision} engine; build it with `ptqd build {b.root} --precisions "
                        f"{precision}` (available: {', '.join(['fp32'] + sorted(built))})")
    entries = built[precision].get("buckets") or [{"engine": f"engines/onnxruntime/{precision}.onnx"}]
    if len(entries) == 1:
        return OrtRunner(b.path(entries[0]["engine"]), threads, allow_spinning)
    # engines take turns: no spinning threads (MEASURED.md)
    return BucketedRunner([(tuple(e["t_range"]), OrtRunner(b.path(e["engine"]), threads, allow_spinning=False))
                           for e in entries])


def _open(bundle, precision: str = "fp32", threads: int | None = None, allow_spinning: bool = True):
    import numpy as np

    from ptqd.runtime.runners import OrtDecoder

    b = Bundle.open(bundle)
    facts = b.facts
    runner = open_engine(b, precision, threads, allow_spinning) if precision else None
    decoder = OrtDecoder(b.path(FIRST_STAGE_ONNX), threads) if b.has(FIRST_STAGE_ONNX) else None
    table = np.load(b.path(CLASS_EMBEDDING)) if b.has(CLASS_EMBEDDING) else None
    return b, facts, runner, decoder, table


def default_labels(facts, classes, num: int):
    import numpy as np

    cond = facts.conditioning
    if cond.kind == "none":
        if classes:
            raise UserError("the model is unconditional: drop --classes")
        return np.zeros(num, dtype=np.int64)
    if not classes:
        classes = [c for c in range(cond.num_classes) if c != cond.null_class]
    bad = [c for c in classes if not 0 <= c < cond.num_classes]
    if bad:
        raise UserError(f"--classes {bad} out of range: the model has classes 0..{cond.num_classes - 1}")
    return np.array([classes[i % len(classes)] for i in range(num)], dtype=np.int64)


def _sampler_config(facts, steps: int, eta: float, guidance: float):
    from ptqd.runtime.sampler import SamplerConfig

    cfg = SamplerConfig(steps=steps, eta=eta, guidance=guidance)
    cfg.validate(facts.schedule.num_train_timesteps)
    if facts.conditioning.kind == "none" and guidance != 1.0:
        cfg = SamplerConfig(steps=steps, eta=eta, guidance=1.0)
    return cfg


def sample(bundle, classes=None, num: int = 16, seed: int = 0, steps: int = 20, eta: float = 0.0,
           guidance: float = 3.0, out: str | os.PathLike | None = None, precision: str = "fp32",
           batch: int = 64, progress: bool | None = None, correction: str = "auto"):
    """Sample ``num`` images (labels cycle through ``classes``). Returns (images uint8 NHWC, labels).

    ``precision``: ``fp32``, an engine (``w8a8``, ...), ``auto`` (the bundle's mixed-precision plan) or
    a plan FILE.json. ``correction``: PTQD's correction and VSC, ``auto`` (on where fitted), ``on``, ``off``.
    ``out``: ``FILE.png`` writes a grid, ``FILE.npz`` writes ``images`` and ``labels``. Sample i's noise
    depends only on (seed, i): the same seed pairs samples across engines.
    """
    import numpy as np

    from ptqd.compiler import step_engines
    from ptqd.runtime.pipeline import decode, sample_latents
    from ptqd.validate import output_file, sampling_counts

    sampling_counts(num=num, batch=batch, seed=seed)  # every option is checked before any work
    if correction not in ("auto", "on", "off"):
        raise UserError(f"--correction must be auto, on or off, got {correction!r}")
    if out is not None and Path(out).suffix not in (".png", ".npz"):
        raise UserError(f"--out {out}: expected a .png (grid) or .npz (arrays) file")
    if out is not None:
        output_file(out)
    b, facts, _, decoder, table = _open(bundle, None)
    cfg = _sampler_config(facts, steps, eta, guidance)
    sampling_counts(num=num, sample_shape=facts.image_shape if decoder is not None else facts.latent_shape,
                    itemsize=1 if decoder is not None else 4)
    labels = default_labels(facts, list(classes) if classes else None, num)
    if decoder is None and out is not None and Path(out).suffix == ".png":
        raise UserError(f"{b.root} has no first-stage decoder, so samples stay latents: write .npz instead")
    runner, _label = step_engines(b, precision, correction)
    chunks = []
    with _progress(num, f"sample {precision}", progress) as bar:
        for s0 in range(0, num, batch):
            idx = np.arange(s0, min(num, s0 + batch))
            lat = sample_latents(runner, facts, table, labels[idx], idx, seed, cfg)
            chunks.append(decode(decoder, lat, facts.scale_factor) if decoder is not None else lat)
            bar.update(len(idx))
    images = np.concatenate(chunks)
    if out is not None:
        write_samples(Path(out), images, labels, cols=_grid_cols(facts, classes, num))
    return images, labels


def _grid_cols(facts, classes, num: int) -> int:
    if facts.conditioning.kind == "class":
        return min(num, len(classes) if classes else facts.conditioning.num_classes - 1)
    return min(num, 8)


def write_samples(out: Path, images, labels, cols: int) -> None:
    try:
        _write_samples(out, images, labels, cols)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e})") from None


def _write_samples(out: Path, images, labels, cols: int) -> None:
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, labels=labels)
    else:
        from PIL import Image

        from ptqd.runtime.pipeline import grid

        g = grid(images, cols, scale=max(1, 96 // images.shape[1]))
        Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(tmp, format="PNG")
    os.replace(tmp, out)


@writes_bundle(when="write_report")
def evaluate(bundle, precisions=("fp32",), num: int = 500, seed: int = 0, steps: int = 20, eta: float = 0.0,
             guidance: float = 3.0, classes=None, features: str | os.PathLike | None = None, batch: int = 100,
             progress: bool | None = None, write_report: bool = True, correction: str | tuple = "auto",
             rows: list[tuple[str, str | tuple]] | None = None, report_name: str = "eval",
             vsc_direction: str = "sigma", eps_mse: bool = True) -> dict[str, Any]:
    """Quality rows for ``precisions`` (engines, ``auto`` for the plan, or plan files) against FP (always
    the first row) on the same seeds and classes. ``correction`` applies to every row; ``rows``, a list
    of (precision, correction) pairs, replaces ``precisions`` for mixed settings (the ablation)."""
    import numpy as np

    from ptqd.compiler import plan_bops, precision_bops, step_engines
    from ptqd.evaluate import DEMO_FEATURES, DEMO_REAL, FeatureModel, evaluate_runners, frechet_distance

    import dataclasses

    from ptqd.validate import sampling_counts

    sampling_counts(num=num, batch=batch, seed=seed)
    b, facts, fp_runner, decoder, table = _open(bundle, "fp32", allow_spinning=False)
    cfg = dataclasses.replace(_sampler_config(facts, steps, eta, guidance), vsc_direction=vsc_direction)
    cfg.validate(facts.schedule.num_train_timesteps)
    labels = default_labels(facts, list(classes) if classes else None, num)
    runners, specs, cache = {"fp32": fp_runner}, {"fp32": "fp32"}, {}
    for p, corr in rows if rows is not None else [(p, correction) for p in precisions]:
        if p == "fp32" and corr in ("auto", "off"):
            continue
        eng, label = step_engines(b, p, corr, cache=cache)
        runners[label], specs[label] = eng, p
    feat_path = Path(features) if features else (b.path(DEMO_FEATURES) if b.has(DEMO_FEATURES) else None)
    if feat_path is not None and not feat_path.exists():
        raise UserError(f"--features {feat_path}: file not found")
    fmodel = FeatureModel(feat_path) if feat_path is not None else None
    rf = None
    reference: dict[str, Any] = {}
    if b.has(DEMO_REAL) and fmodel is not None:
        data = np.load(b.path(DEMO_REAL))
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
    with _progress(num, report_name, progress) as bar:
        res = evaluate_runners(facts, table, runners, decoder, labels, seed, cfg, batch=batch, features=fmodel,
                               real_features=rf, progress=bar, eps_mse=eps_mse)
    res.reference = reference
    fp_bops = precision_bops(b, "fp32") if b.has(UNET_LAYERS) else None
    for row in res.rows:
        spec = specs[row["precision"]]
        if fp_bops and (spec in ("fp32", "auto", "ort-int8") or spec in OUR_PRECISIONS or spec.endswith(".json")):
            v = plan_bops(b, spec, cfg.steps, cfg.spacing)
            row["bops_per_forward"] = v
            row["bops_saving"] = fp_bops / v
    report = res.to_json()
    if write_report:
        with Bundle.transaction(b.root) as w:
            w.write_json(f"reports/{report_name}.json", report)
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
                                      batch=batch, progress=progress, rows=rows, report_name=f"ablation_eta{eta:g}")
    return out


DEMO_ROWS = (("ort-int8", "off"), ("w8a8", "off"), ("w8a8", "on"), ("w4a8", "off"), ("w4a8", "on"),
             ("w4a4", "off"), ("w4a4", "on"), ("auto", "on"))


def demo(out: str | os.PathLike = "demo-out", num: int = 500, seed: int = 0, steps: int = 20, eta: float = 0.0,
         guidance: float = 3.0, progress: bool | None = None, log=print) -> dict[str, Any]:
    """The demo end to end: compile the demo model (reusing finished stages), sample a grid with the
    mixed-precision plan, and evaluate every engine and the plan against FP on the same seeds."""
    from ptqd.bench import unet_latency
    from ptqd.compiler import compile as compile_model

    out = Path(out)
    bundle = out / "demo.bundle"
    comp = compile_model("demo", bundle, precisions=OUR_PRECISIONS + (PEER,), progress=progress, log=log)
    grid_path = out / "samples.png"
    sample(bundle, classes=list(range(10)), num=40, seed=seed, steps=steps, eta=eta, guidance=guidance,
           out=grid_path, precision="auto", progress=progress)
    report = evaluate(bundle, rows=list(DEMO_ROWS), num=num, seed=seed, steps=steps, eta=eta, guidance=guidance,
                      progress=progress)
    b = Bundle.open(bundle)
    cfg_x = 2 if b.facts.conditioning.kind == "class" else 1
    lat = unet_latency(b, OUR_PRECISIONS + (PEER,), batch=cfg_x)
    # speed where the demo shows it: the sampler's real batch (evaluate's 100 images, CFG-doubled)
    real = unet_latency(b, OUR_PRECISIONS + (PEER,), batch=100 * cfg_x, runs=5, warmup=1)
    plan_steps = b.read_json("calib/plan.json")["steps"]
    for row in report["rows"]:
        p = row["precision"].split("+")[0]
        if p in lat:
            row["unet_ms"] = lat[p]["median_ms"]
            row["images_per_s"] = 100 / (steps * real[p]["median_ms"] / 1e3)
        elif p == "plan":  # the plan's engines, weighted by the steps each runs
            row["unet_ms"] = sum(lat[s["precision"]]["median_ms"] for s in plan_steps) / len(plan_steps)
            row["images_per_s"] = 100 / sum(real[s["precision"]]["median_ms"] / 1e3 for s in plan_steps)
    return {"bundle": str(bundle), "stages": comp["stages"], "plan": comp["plan"], "grid": str(grid_path),
            "eval": report, "latency": lat}


def train_demo(out: str | os.PathLike | None = None, seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Retrain the demo model and classifier (about 20 minutes on 2 cores); default: over the shipped weights."""
    from ptqd.models.demo import demo_dir, train_demo as _train

    return _train(Path(out) if out else demo_dir(), seed=seed, progress=progress)


# ---- calibrate and build ----------------------------------------------------------------------
CALIB_FEEDS = "calib/feeds.npz"
OUR_PRECISIONS = ("w8a8", "w4a8", "w4a4")
PEER = "ort-int8"
# Engine vs fake-quant ε, relative L2 per timestep. The fake-quant model emulates the integer kernels
# exactly; the float ops around them (GroupNorm, SiLU, softmax) round differently in torch and ORT, and
# now and then that moves an input across a quantization tie: a rare 1-LSB flip that the rest of the
# network carries along. So: the median timestep must agree to float noise, the worst within 2e-2 for
# 8-bit activations and 1e-1 for 4-bit ones (a tie flip there moves a value by 1/15 of its range, not 1/255).
ENGINE_TOLERANCE = {"median_rel_l2": 1e-4, "worst_rel_l2": 2e-2, "worst_rel_l2_a4": 1e-1}
VALIDATION_TIMESTEPS = (1, 101, 251, 401, 501, 601, 751, 951)


def _load_source(b: Bundle):
    """The torch model the bundle was exported from (the calibrator needs it); checked by sha256."""
    from ptqd.models import load_model

    rec = b.stage("export") or {}
    src = rec.get("source")
    if src is None:
        raise UserError(f"{b.root} has no export record; export the model first")
    if src != "demo" and not Path(src).exists():
        raise UserError(f"calibration needs the source model {src} (gone since export); export again from where it is")
    if rec.get("source_sha256") and _source_digest(src) != rec["source_sha256"]:
        raise UserError(f"{src} changed since it was exported to {b.root}; export again")
    loaded = load_model(src, with_first_stage=False)
    facts = b.facts
    for name in ("latent_shape", "conditioning", "schedule"):  # what the UNet's inputs and the sampler use
        if getattr(loaded.facts, name) != getattr(facts, name):
            raise UserError(f"{b.root}: the manifest's model {name} ({getattr(facts, name)}) is not the source "
                            f"model's ({getattr(loaded.facts, name)}); the manifest was edited or damaged: export "
                            "again")
    return loaded


@writes_bundle()
def calibrate(bundle, samples: int | None = None, steps: int | None = None, eta: float = 0.0,
              guidance: float = 3.0, method: str = "mse", rounding: str = "gptq", buckets: int = 1,
              device: str = "auto", preset: str = "auto", progress: bool | None = None) -> dict:
    """Observe activations along FP trajectories; write quantization parameters per precision.

    ``samples``/``steps`` default to the compute ``preset`` for the model's size (see ``ptqd.budget``).
    Memory is bounded: statistics for every layer, but second moments (H) only for one group of
    layers at a time (``observe``); ``device`` runs the torch work on a GPU where there is one."""
    import time

    import numpy as np

    from ptqd.budget import preset_for
    from ptqd.calib.calibrate import (
        CalibConfig,
        bucket_steps,
        quantize_layers,
        quantize_weights,
        save_params,
        select_layers,
        with_inputs,
    )
    from ptqd.calib.device import describe, resolve_device
    from ptqd.calib.observe import record_trajectories
    from ptqd.runtime.sampler import DDIMSampler

    b = Bundle.open(bundle)
    table = b.read_json(UNET_LAYERS)
    pre = preset_for(preset, table)
    cfg = CalibConfig(samples=pre.calib_samples if samples is None else samples,
                      steps=pre.steps if steps is None else steps, eta=eta, guidance=guidance, method=method,
                      rounding=rounding, buckets=buckets, batch=pre.calib_batch)
    cfg.validate()
    dev = resolve_device(device)
    facts = b.facts
    scfg = _sampler_config(facts, cfg.steps, eta, guidance)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = _load_source(b)
    selected = with_inputs(select_layers(table["layers"], cfg.keep_fp), b.path(UNET_ONNX))
    labels = default_labels(facts, None, cfg.samples)
    chunks = cfg.seeds * -(-cfg.samples // cfg.batch)
    with _progress(chunks + len(selected), "calibrate", progress) as bar:
        bar.set_postfix_str(f"observing {len(selected)} layers over {cfg.steps} steps on {describe(dev)}")
        rec = record_trajectories(loaded, selected, labels, np.arange(cfg.seeds), scfg, dev, batch=cfg.batch,
                                  progress=bar)
        seconds["observe"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        bar.set_postfix_str(f"H + {cfg.rounding} weights, layer groups of <= {pre.hessian_mb} MB")
        weights = quantize_weights(loaded, selected, rec, cfg, dev, feeds_items=pre.hessian_items,
                                   budget_bytes=pre.hessian_mb << 20, progress=bar)
        seconds["weights"] = round(time.perf_counter() - t1, 1)
        t1 = time.perf_counter()
        feeds = rec.feeds
        record: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items()}, "layers": len(selected),
                                  "calibration_inputs": sum(len(f[0]) for f in feeds), "precisions": {},
                                  "device": describe(dev), "preset": pre.name}
        sampler = DDIMSampler(facts.schedule.alphas_cumprod, scfg.spacing)
        sampler.set_timesteps(cfg.steps)
        groups = bucket_steps(cfg.steps, buckets)
        record["buckets"] = [{"steps": g, "t_range": [int(sampler.timesteps[g[-1]]), int(sampler.timesteps[g[0]])]}
                             for g in groups]
        with Bundle.transaction(b.root) as w:
            for rel in w.listed("calib/") + w.listed("engines/"):
                w.remove(rel)  # a new calibration replaces the old one whole, and the engines built from it go
            for stage in ("build", "build_tensorrt", "correct", "plan"):
                w.drop_stage(stage)
            ranges: dict = {}
            for p in cfg.precisions:
                first = None
                for k, g in enumerate(groups):
                    layers = quantize_layers(loaded, selected, rec.obs, cfg, p, weights,
                                             steps=None if buckets == 1 else g, range_cache=ranges)
                    first = first or layers
                    meta, arrays = save_params(layers)
                    meta["bucket"] = record["buckets"][k]
                    w.write_json(f"calib/{p}{bucket_suffix(k, buckets)}.json", meta)
                    buf = io.BytesIO()
                    np.savez(buf, **arrays)
                    w.write_bytes(f"calib/{p}{bucket_suffix(k, buckets)}.npz", buf.getvalue())
                errs = {k: float(np.mean([lq.errors[k] for lq in first if k in lq.errors]))
                        for k in first[0].errors}
                record["precisions"][p] = {"mean_layer_rel_error": errs}
            # per-step input ranges: what timestep buckets would have to absorb
            record["per_step_input_range"] = {
                o.name: {int(s): [st.lo, st.hi] for s, st in sorted(o.inputs.items())} for o in rec.obs.values()}
            buf = io.BytesIO()
            np.savez_compressed(buf, x=np.concatenate([f[0] for f in feeds]), t=np.concatenate([f[1] for f in feeds]),
                                **({"context": np.concatenate([f[2] for f in feeds])} if feeds[0][2] is not None else {}))
            w.write_bytes(CALIB_FEEDS, buf.getvalue())
            seconds["ranges_and_write"] = round(time.perf_counter() - t1, 1)
            seconds["total"] = round(time.perf_counter() - t0, 1)
            record["seconds"] = seconds
            w.write_json("calib/calibration.json", record)
            from ptqd.compiler import digest

            w.set_stage("calibrate", {**{k: record[k] for k in ("config", "layers", "calibration_inputs", "buckets",
                                                                "seconds", "device", "preset")},
                                      "inputs": digest(b, (UNET_ONNX, UNET_LAYERS))})
    return record


def bucket_suffix(k: int, buckets: int) -> str:
    """File-name suffix of timestep bucket k: none with a single bucket, ``.b<k>`` otherwise."""
    return "" if buckets == 1 else f".b{k}"


def _peer_int8(b: Bundle, out_qdq: Path, rows: list[dict]) -> None:
    """ONNX Runtime's own quantize_static on the same calibration inputs (the tool users would pick)."""
    import numpy as np
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    data = np.load(b.path(CALIB_FEEDS))
    n = len(data["t"])
    chunk = 64

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= n:
                return None
            sl = slice(self.i, self.i + chunk)
            self.i += chunk
            feeds = {"x": data["x"][sl], "t": data["t"][sl]}
            if "context" in data:
                feeds["context"] = data["context"][sl]
            return feeds

    import logging

    attention = [r["name"] for r in rows if r["kind"] == "attention"]
    logging.disable(logging.WARNING)  # quantize_static's advice to pre-process goes to the root logger
    import shutil
    import tempfile

    src = b.path(UNET_ONNX)
    with tempfile.TemporaryDirectory(prefix="ptqd-peer-") as tmp:
        ext = src.with_name(src.name + ".data")
        if ext.exists():  # onnx.load refuses hard-linked external data (the staging copy): use a private copy
            shutil.copy(src, Path(tmp) / src.name)
            shutil.copy(ext, Path(tmp) / ext.name)
            src = Path(tmp) / src.name
        try:
            quantize_static(str(src), str(out_qdq), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                            nodes_to_exclude=attention, use_external_data_format=ext.exists())
        finally:
            logging.disable(logging.NOTSET)


def validation_inputs(bundle_or_feeds, count: int = len(VALIDATION_TIMESTEPS), per_step: int = 2) -> list[dict]:
    """Engine validation inputs from the calibration's own UNet inputs (calib/feeds.npz): ``count``
    timesteps spread over the calibrated schedule, ``per_step`` inputs each (the first of each half of a
    guided batch, so conditional and unconditional rows both take part).

    An engine is checked where it was calibrated: off that distribution (e.g. N(0, 1) latents at
    t = 1 for a model whose trajectories end far from N(0, 1)) its activations clip, the quantization
    noise dominates, and 1-LSB rounding differences between two exact-up-to-float-rounding
    implementations no longer stay small."""
    import numpy as np

    data = bundle_or_feeds if isinstance(bundle_or_feeds, dict) else dict(np.load(bundle_or_feeds.path(CALIB_FEEDS)))
    t = data["t"]
    steps = np.unique(t)[::-1]
    pick = steps[np.unique(np.linspace(0, len(steps) - 1, min(count, len(steps))).round().astype(int))]
    out = []
    for tv in pick:
        rows = np.flatnonzero(t == tv)
        half = rows[: max(1, len(rows) // 2)] if len(rows) > 1 else rows
        idx = np.unique([half[0], rows[len(rows) // 2]])[:per_step]
        f = {"x": data["x"][idx], "t": data["t"][idx]}
        if "context" in data:
            f["context"] = data["context"][idx]
        out.append(f)
    return out


def validate_engine(runner, reference, inputs: list[dict], act_bits: int = 8) -> dict:
    """Engine vs a reference runner (the fake-quant model) on ``inputs`` (see :func:`validation_inputs`):
    rel-L2 and max abs error per input, their median and worst, and whether they pass ENGINE_TOLERANCE."""
    import numpy as np

    rows = []
    for f in inputs:
        got, ref = runner(f["x"], f["t"], f.get("context")), reference(f["x"], f["t"], f.get("context"))
        rows.append({"t": float(f["t"][0]), "max_abs": float(np.abs(got - ref).max()),
                     "rel_l2": float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))})
    rel = [r["rel_l2"] for r in rows]
    return {"per_timestep": rows, "median_rel_l2": float(np.median(rel)), "worst_rel_l2": max(rel),
            "worst_max_abs": max(r["max_abs"] for r in rows), "inputs": "calibration trajectories (calib/feeds.npz)",
            "passed": float(np.median(rel)) <= ENGINE_TOLERANCE["median_rel_l2"]
            and max(rel) <= ENGINE_TOLERANCE["worst_rel_l2" if act_bits >= 8 else "worst_rel_l2_a4"]}


CASCADE_SLACK = 1.25  # a rounding cascade passes when the engine is at most this much further from FP


def _validate_built(b: Bundle, eng_path, loaded, layers, inputs: list[dict], act_bits: int) -> dict:
    """Engine vs its fake-quant model (end to end), and every integer kernel on its own inputs.

    Passes when the kernels are exact and their constants are the calibration's, and either ε agrees
    within ENGINE_TOLERANCE, or (a rounding cascade: see ``ptqd.engines.kernels``) the engine is no
    further from FP32 than ``CASCADE_SLACK`` x its fake-quant model is."""
    import numpy as np

    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.kernels import check_kernels
    from ptqd.runtime.runners import OrtRunner
    from ptqd.runtime.torch_runner import TorchRunner

    ref = TorchRunner(fake_quant_model(loaded.unet, layers))
    engine = OrtRunner(eng_path)
    val = validate_engine(engine, ref, inputs, act_bits=act_bits)
    val["tolerance"] = ENGINE_TOLERANCE
    kern = check_kernels(eng_path, layers, inputs[len(inputs) // 2])
    val["kernels"] = kern
    close = val["passed"]
    if not kern["passed"]:
        what = kern["mismatched"][:3] or kern["constant_mismatches"][:3]
        val["failure"] = (f"{len(kern['mismatched'])} of {kern['kernels']} integer kernels differ from their integer "
                          f"math, {len(kern['constant_mismatches'])} constants differ from the calibration: {what}")
    elif not close:
        fp = OrtRunner(b.path(UNET_ONNX))

        def rel(a, r):
            return float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-12))

        e_vs_fp, q_vs_fp = [], []
        for f in inputs:
            args = (f["x"], f["t"], f.get("context"))
            r = fp(*args)
            e_vs_fp.append(rel(engine(*args), r))
            q_vs_fp.append(rel(ref(*args), r))
        val["cascade"] = {"engine_vs_fp32_median": float(np.median(e_vs_fp)),
                          "fake_quant_vs_fp32_median": float(np.median(q_vs_fp)), "slack": CASCADE_SLACK}
        if np.median(e_vs_fp) <= CASCADE_SLACK * np.median(q_vs_fp):
            val["passed"] = True
            val["verdict"] = ("rounding cascade: every integer kernel exact, the engine no further from FP32 than "
                              "its fake-quant model")
        else:
            val["failure"] = (f"kernels exact, but ε differs from the fake-quant model by rel-L2 median "
                              f"{val['median_rel_l2']:.3g} (tolerance {ENGINE_TOLERANCE['median_rel_l2']:g}) and the "
                              f"engine is further from FP32 ({np.median(e_vs_fp):.3g}) than {CASCADE_SLACK:g} x its "
                              f"fake-quant model ({np.median(q_vs_fp):.3g})")
    if close and kern["passed"]:
        val["verdict"] = "exact: ε within tolerance of the fake-quant model, every integer kernel exact"
    val["passed"] = bool(kern["passed"] and val["passed"])
    return val


@writes_bundle()
def build(bundle, backend: str = "onnxruntime", precisions=None, validate: bool = True,
          progress: bool | None = None) -> dict:
    """One engine per precision from the calibration; validated against the fake-quant model."""
    import time

    import numpy as np

    from ptqd.calib.calibrate import load_params
    from ptqd.engines.onnxruntime import build_engine, describe_engine, pack_4bit_weights
    from ptqd.engines.qdq import write_qdq
    from ptqd.errors import ExportError

    if backend == "tensorrt":
        from ptqd.tensorrt_backend import TRT_PRECISIONS, build_tensorrt

        return build_tensorrt(bundle, TRT_PRECISIONS if precisions is None else tuple(precisions), validate, progress)
    if backend != "onnxruntime":
        raise UserError(f"--backend must be onnxruntime or tensorrt, got {backend!r}")
    precisions = OUR_PRECISIONS + (PEER,) if precisions is None else tuple(precisions)
    bad = [p for p in precisions if p not in OUR_PRECISIONS + (PEER,)]
    if bad:
        raise UserError(f"unknown precision(s) {bad}; choose from {', '.join(OUR_PRECISIONS + (PEER,))}")
    b = Bundle.open(bundle)
    if b.stage("calibrate") is None:
        raise UserError(f"{b.root} is not calibrated: run `ptqd calibrate {b.root}` first")
    rows = b.read_json(UNET_LAYERS)["layers"]
    loaded = _load_source(b) if validate and any(p != PEER for p in precisions) else None
    val_inputs = validation_inputs(b) if validate else None
    records: dict[str, Any] = {}
    calib_buckets = b.stage("calibrate").get("buckets") or [{"t_range": [0, b.facts.schedule.num_train_timesteps - 1]}]
    old = b.read_json(BUILD_JSON) if b.has(BUILD_JSON) else {}
    with _progress(len(precisions), "build", progress) as bar, Bundle.transaction(b.root) as w:
        for p in precisions:
            t0 = time.perf_counter()
            bar.set_postfix_str(p)
            for rel in w.listed(f"engines/onnxruntime/{p}."):
                w.remove(rel)  # a rebuild replaces every bucket's engine of this precision
            layers = None
            if p == PEER:
                qdq_path, eng_path = w.file(f"engines/onnxruntime/{p}.qdq.onnx"), w.file(f"engines/onnxruntime/{p}.onnx")
                _peer_int8(b, qdq_path, rows)
                rec: dict[str, Any] = {"numerics": "ONNX Runtime quantize_static: QDQ, U8 activations (MinMax), "
                                                   "S8 per-channel weights, reduce_range; attention matmuls float"}
            else:
                wb, ab = p[1], p[3]
                rec = {"numerics": f"w{wb}a{ab} numerics on int8 kernels (QLinearConv, MatMulIntegerToFloat)"
                                   + (": weights on the 4-bit grid, stored two per byte (expanded at load)"
                                      if wb == "4" else
                                      ": 8-bit weights on the reduce-range grid ±63 (exact on AVX2 u8s8)")
                                   + (", activations clipped to the 4-bit grid" if ab == "4" else "")
                                   + "; conv outputs requantized to 8 bits; first/last layers and embedding "
                                     "Gemms 8-bit; skip and downsample convs " + ("float" if p == "w8a8" else "8-bit")
                                   + "; attention matmuls float"}
            buckets = calib_buckets if p != PEER else [None]
            rec["buckets"] = []
            for k, bucket in enumerate(buckets):
                sfx = bucket_suffix(k, len(buckets))
                if p != PEER:
                    qdq_path, eng_path = w.file(f"engines/onnxruntime/{p}{sfx}.qdq.onnx"), w.file(
                        f"engines/onnxruntime/{p}{sfx}.onnx")
                    layers = load_params(b.read_json(f"calib/{p}{sfx}.json"), np.load(b.path(f"calib/{p}{sfx}.npz")))
                    write_qdq(b.path(UNET_ONNX), layers, qdq_path)
                build_engine(qdq_path, eng_path)
                packed = pack_4bit_weights(eng_path, layers) if layers and p in ("w4a8", "w4a4") else {}
                desc = describe_engine(eng_path, rows)
                if k == 0:
                    rec.update(desc, **packed)
                entry = {"t_range": bucket["t_range"] if bucket else None,
                         "engine": eng_path.relative_to(w.staging).as_posix(), "size_bytes": desc["size_bytes"]}
                if validate and layers is not None:
                    val = _validate_built(b, eng_path, loaded, layers, val_inputs, int(ab))
                    entry["validation_vs_fake_quant"] = val
                    if k == 0:
                        rec["validation_vs_fake_quant"] = val
                    if not val["passed"]:
                        raise ExportError(f"{p}{sfx} engine validation failed: {val['failure']}")
                rec["buckets"].append(entry)
            rec["build_seconds"] = round(time.perf_counter() - t0, 1)
            records[p] = rec
            bar.update()
        merged = {**old, **records}
        w.write_json(BUILD_JSON, merged)
        from ptqd.compiler import BUILD_INPUTS, digest

        w.set_stage("build", {"backend": backend, "precisions": sorted(merged), "inputs": digest(b, BUILD_INPUTS)})
    return records


from ptqd.compiler import bops_table, compile, correct, plan  # noqa: E402, F401  (re-exported)


def lint(bundle, target: str = "tensorrt") -> dict:
    """Check each precision's QDQ graph against ``target``'s rules on the CPU ({graph: [Finding]})."""
    from ptqd.tensorrt_backend import lint as _lint

    return _lint(bundle, target)
