"""What several stages share: the source model behind a bundle, input digests for reuse, and the
calibrated layers of a precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ptqd.bundle import Bundle, layout, sha256_file
from ptqd.errors import UserError


def source_digest(model) -> str | None:
    """sha256 of the weights file the bundle was exported from (so `demo` can tell a stale bundle)."""
    if str(model) == "demo":
        from ptqd.models.demo import demo_dir

        return sha256_file(demo_dir() / "demo_ldm.safetensors")
    p = Path(model)
    return sha256_file(p) if p.is_file() else None


def source_bytes(model) -> int:
    """Bytes of the weights behind ``model`` (a checkpoint file, a diffusers directory's weight files, the
    demo): what the export's memory scales with."""
    if str(model) == "demo":
        from ptqd.models.demo import demo_dir

        return (demo_dir() / "demo_ldm.safetensors").stat().st_size
    p = Path(model)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.suffix in (".safetensors", ".bin", ".ckpt", ".pt"))
    return p.stat().st_size if p.is_file() else 0


def load_source(b: Bundle):
    """The torch model the bundle was exported from (the calibrator needs it); checked by sha256."""
    from ptqd.models import load_model

    rec = b.stage("export") or {}
    src = rec.get("source")
    if src is None:
        raise UserError(f"{b.root} has no export record; export the model first")
    if src != "demo" and not Path(src).exists():
        raise UserError(f"calibration needs the source model {src} (gone since export); export again from where it is")
    if rec.get("source_sha256") and source_digest(src) != rec["source_sha256"]:
        raise UserError(f"{src} changed since it was exported to {b.root}; export again")
    loaded = load_model(src, with_first_stage=False)
    if rec.get("outliers"):  # the body layers' rewrite the graph was exported with
        import numpy as np

        from ptqd.calib import outliers

        outliers.apply(loaded, outliers.load(b.read_json(layout.OUTLIERS_JSON), np.load(b.path(layout.OUTLIERS_NPZ))))
    facts = b.facts
    for name in ("latent_shape", "conditioning", "schedule"):  # what the UNet's inputs and the sampler use
        mine, theirs = getattr(loaded.facts, name), getattr(facts, name)
        if not (mine.same_model(theirs) if name == "conditioning" else mine == theirs):
            raise UserError(f"{b.root}: the manifest's model {name} ({getattr(facts, name)}) is not the source "
                            f"model's ({getattr(loaded.facts, name)}); the manifest was edited or damaged: export "
                            "again")
    if facts.conditioning.kind == "text":  # the prompts the bundle was exported with, encoded
        loaded.facts, loaded.class_embedding = facts, layout.class_embedding(b)
    return loaded


def digest(b: Bundle, prefixes: tuple[str, ...]) -> dict[str, str]:
    """sha256 of the bundle files a stage consumed (what makes a finished stage reusable)."""
    return {rel: rec["sha256"] for rel, rec in sorted(b.files.items()) if rel.startswith(prefixes)}


# settings added to a stage's config after bundles were made: what a record without them ran
CONFIG_DEFAULTS = {"attention": "float"}


def reusable(b: Bundle, stage: str, inputs: tuple[str, ...], **config) -> bool:
    """A finished stage is reused when its record's inputs (sha256) and settings are unchanged."""
    rec = b.stage(stage)
    if not rec or rec.get("inputs") != digest(b, inputs):
        return False
    return all(rec.get(k) == v if k != "config" else all(rec["config"].get(ck, CONFIG_DEFAULTS.get(ck)) == cv
                                                         for ck, cv in v.items())
               for k, v in config.items())


def commit_build(w, b: Bundle, backend: str, stage: str, old: dict, records: dict) -> None:
    """Merge a build's per-precision ``records`` over the backend's previous build.json and record the
    stage (its precisions and the sha256 of what it read), inside the build's transaction ``w``."""
    merged = {**old, **records}
    w.write_json(layout.build_json(backend), merged)
    w.set_stage(stage, {"backend": backend, "precisions": sorted(merged), "inputs": digest(b, layout.BUILD_INPUTS)})


def require_calibrated(b: Bundle) -> dict:
    cal = b.stage("calibrate")
    if cal is None:
        raise UserError(f"{b.root} is not calibrated: run `ptqd calibrate {b.root}` first")
    return cal


FULL_GRID_NEEDS = ("8-bit weights on the full ±127 grid (`--weight-grid full`): ONNX Runtime's and OpenVINO's u8s8 "
                   "kernels compute them exactly only where int8 products are summed in 32 bits (VNNI or AMX); "
                   "AVX2 alone sums pairs in 16 bits and saturates")


def engine_requirements(b: Bundle) -> dict:
    """What an engine built from ``b``'s calibration needs of the CPU it runs on, recorded in build.json as
    ``requires`` and checked when it is built and loaded (``ptqd.resources.check_requirements``): {} for the portable
    ±63 grid, {"isa": "vnni", ...} for the full one."""
    from ptqd.resources import VNNI_FLAGS

    cfg = (b.stage("calibrate") or {}).get("config") or {}
    if cfg.get("reduce_range", True):
        return {}
    return {"isa": "vnni", "flags_any": list(VNNI_FLAGS), "why": FULL_GRID_NEEDS}


def buildable_here(b: Bundle) -> dict:
    """:func:`engine_requirements`, after refusing (with the fix) a build on a CPU that lacks them."""
    from ptqd.resources import check_requirements

    requires = engine_requirements(b)
    check_requirements(requires, f"the calibration of {b.root}", f"Build on a CPU with VNNI or AMX, or recalibrate "
                                                                 f"with `ptqd calibrate {b.root} --weight-grid portable`.")
    return requires


def calib_layers(b: Bundle, precision: str, k: int = 0, buckets: int = 1):
    """The quantized layers (``LayerQuant``) of one precision and timestep bucket."""
    from ptqd.calib.calibrate import load_params

    meta, arrays = layout.calib_params(precision, k, buckets)
    return load_params(b.read_json(meta), np.load(b.path(arrays)))


def calib_attention(b: Bundle, precision: str, k: int = 0, buckets: int = 1) -> list:
    """The quantized attention matmuls (``calib.attention.MatMulQuant``) of one precision and timestep bucket
    (none unless the bundle was calibrated with ``--attention qk`` or ``int8``)."""
    from ptqd.calib import attention

    meta, _ = layout.calib_params(precision, k, buckets)
    return attention.load(b.read_json(meta))


def fake_quant_runners(b: Bundle, loaded, precisions, device=None) -> dict:
    """precision -> (timestep -> torch runner of its timestep bucket: the one whose t-range holds it, or the
    nearest, as ``BucketedRunner`` picks the engine)."""
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.runner import nearest_bucket
    from ptqd.engines.torch_ref import TorchRunner

    buckets = b.stage("calibrate").get("buckets") or [{}]
    ranges = [tuple(bk.get("t_range") or (0, 0)) for bk in buckets]
    out = {}
    for p in precisions:
        runners = [TorchRunner(fake_quant_model(loaded.unet, calib_layers(b, p, k, len(buckets)),
                                                calib_attention(b, p, k, len(buckets))), device)
                   for k in range(len(buckets))]
        out[p] = (lambda rs: (lambda t: rs[nearest_bucket(float(t), ranges)]))(runners)
    return out


def check_sampler_option(sampler: str | None) -> None:
    """One-line error for a ``--sampler`` that is not auto or a name ptqd reproduces."""
    from ptqd.runtime.schedulers import SAMPLER_CHOICES

    if sampler not in (None, "auto") and sampler not in SAMPLER_CHOICES:
        raise UserError(f"--sampler {sampler!r}: choose auto or one of {', '.join(SAMPLER_CHOICES)}")


def fit_sampler_config(facts, steps: int, eta: float, guidance: float, sampler: str | None = "auto"):
    """The sampler that the correction's fit, its gate and the plan run. ``sampler`` auto (or None): the bundle's
    own (its pipeline's scheduler and config, what ``ptqd sample`` runs by default), so k_t and bias_t are fitted
    at the timesteps its samples visit; DDIM on CompVis spacing for a CompVis bundle, for a scheduler ptqd does
    not reproduce, or for calibration trajectories with η > 0 (η is DDIM's). Else a name of
    ``SAMPLER_CHOICES``, configured from the bundle's scheduler config (``ptqd correct --sampler``)."""
    from ptqd.runtime.loader import sampler_config
    from ptqd.runtime.schedulers import resolve

    if sampler not in (None, "auto"):
        return sampler_config(facts, steps, eta, guidance, sampler)
    if facts.sampler is None or eta > 0:
        return sampler_config(facts, steps, eta, guidance)
    try:
        resolve(facts.sampler, "auto")
    except UserError:  # a scheduler ptqd does not reproduce (other errors, e.g. too many steps, are the user's)
        return sampler_config(facts, steps, eta, guidance)
    return sampler_config(facts, steps, eta, guidance, "auto")


def correction_sampler_config(b: Bundle):
    """The sampler ``correct`` fitted the bundle's correction on (its ``--sampler``; older records: auto), chosen as
    ``correct`` chose it (from the calibrated steps, η and guidance), run at η 0: what the plan measures on."""
    from dataclasses import replace

    c = require_calibrated(b)["config"]
    choice = "auto"
    if b.has(layout.CORRECTION_JSON):
        choice = b.read_json(layout.CORRECTION_JSON)["config"].get("sampler_option", "auto")
    return replace(fit_sampler_config(b.facts, c["steps"], c["eta"], c["guidance"], choice), eta=0.0)
