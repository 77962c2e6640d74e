"""Loading what a bundle holds for sampling: engine runners (ONNX Runtime, OpenVINO or TensorRT, one per timestep
bucket), the decoder, the class embedding, and a plan's engines with PTQD's correction (numpy only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptqd.bundle import layout
from ptqd.errors import UserError
from ptqd.precision import CALIBRATED_NAMES
from ptqd.runtime.correction import CONDITIONAL_PARTS, CORRECTION_PARTS, PTQD_PARTS, CorrectionTable, Plan, StepEngines
from ptqd.runtime.sampler import SamplerConfig

# auto: what the end-to-end gate kept (calib/gate.py); on: PTQD's raw fit and VSC; conditional: E[Δ | ε_q]
CORRECTION_MODES = ("auto", "on", "conditional", "off")
MODE_PARTS = {"auto": CORRECTION_PARTS, "on": PTQD_PARTS, "conditional": CONDITIONAL_PARTS, "off": ()}
MODE_LABELS = {"auto": "+ptqd", "on": "+ptqd-raw", "conditional": "+cond"}


def sampler_config(facts, steps: int, eta: float, guidance: float, sampler: str | None = None) -> SamplerConfig:
    """The sampler's settings, validated for the model (guidance 1 for unconditional models).

    ``sampler``: None, DDIM on CompVis spacing (what calibration, correction and the plan run); ``"auto"``, the
    bundle's own sampler (its pipeline's scheduler and config); or a name of
    :data:`ptqd.runtime.schedulers.SAMPLER_CHOICES`, configured from the bundle's scheduler config."""
    spec = None
    if sampler is not None:
        from ptqd.runtime.schedulers import make_scheduler, resolve
        from ptqd.validate import integer

        spec = resolve(facts.sampler, sampler)
        integer("--steps", steps, 1, make_scheduler(facts.schedule.alphas_cumprod, spec).max_steps())
    cfg = SamplerConfig(steps=steps, eta=eta, guidance=guidance, spec=spec)
    cfg.validate(facts.schedule.num_train_timesteps)
    if facts.conditioning.kind == "none" and guidance != 1.0:
        cfg = SamplerConfig(steps=steps, eta=eta, guidance=1.0, spec=spec)
    return cfg


def default_labels(facts, classes, num: int) -> np.ndarray:
    """``num`` labels cycling through ``classes`` (default: every class but the null class)."""
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


def resolve_backend(b, backend: str | None = "auto", log=None, needs=()) -> str:
    """The backend to run: ``backend`` as given, or for ``auto``/None the one ``ptqd build --backend auto`` timed
    fastest for this bundle (``engines/backend.json``) where it has every engine in ``needs``, else ONNX Runtime
    where it has engines, else OpenVINO. A choice timed on another CPU is still used (it is about speed, never
    about correctness), with a note."""
    if backend not in (None, "auto"):
        return str(backend)
    if b.has(layout.BACKEND_CHOICE):
        rec = b.read_json(layout.BACKEND_CHOICE)
        chosen = rec.get("backend")
        built = layout.built(b, chosen) if chosen in ("onnxruntime", "openvino") else {}
        missing = [p for p in needs if p != "fp32" and p not in built]
        if built and missing and log is not None:
            log(f"note: {b.root}'s faster backend {chosen} has no {', '.join(missing)} engine; running onnxruntime")
        if built and not missing:
            from ptqd.resources import cpu_description

            if log is not None and rec.get("cpu") != cpu_description():
                log(f"note: {b.root}'s backend choice ({chosen}) was timed on another CPU ({rec.get('cpu')}); "
                    f"`ptqd build {b.root} --backend auto` times it again here")
            return chosen
    if layout.built(b, "onnxruntime") or not layout.built(b, "openvino"):
        return "onnxruntime"
    return "openvino"


def open_engine(b, precision: str = "fp32", threads: int | None = None, allow_spinning: bool = True,
                backend: str = "onnxruntime"):
    """A runner for ``precision``: the exported graph for fp32, else the built engine (one per
    timestep bucket when the calibration has several). ``backend="tensorrt"``: the TensorRT plan;
    ``backend="openvino"``: the OpenVINO IR (fp32: the exported graph on OpenVINO)."""
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.runner import BucketedRunner

    if str(backend) == "tensorrt":
        return open_tensorrt_runner(b, precision)
    if str(backend) == "openvino":
        return open_openvino(b, precision, threads)
    if precision == "fp32":
        return OrtRunner(b.path(layout.UNET_ONNX), threads, allow_spinning)
    built = layout.built(b)
    if precision not in built:
        raise UserError(f"{b.root} has no {precision} engine; build it with `ptqd build {b.root} --precisions "
                        f"{precision}` (available: {', '.join(['fp32'] + sorted(built))})")
    _check_cpu(b, precision, built[precision], "onnxruntime")
    entries = built[precision].get("buckets") or [{"engine": layout.ort_engine(precision)[1]}]
    if len(entries) == 1:
        return OrtRunner(b.path(entries[0]["engine"]), threads, allow_spinning)
    # engines take turns: no spinning threads (MEASURED.md)
    return BucketedRunner([(tuple(e["t_range"]), OrtRunner(b.path(e["engine"]), threads, allow_spinning=False))
                           for e in entries])


def _check_cpu(b, precision: str, rec: dict, backend: str) -> None:
    """Refuse an engine whose build record says it needs what this CPU lacks (e.g. full-grid 8-bit weights
    without VNNI), naming the fix, instead of letting it compute wrong numbers."""
    from ptqd.resources import check_requirements

    check_requirements(rec.get("requires"), f"the {precision} engine ({backend}) of {b.root}, built on "
                                            f"{rec.get('built_on', 'another CPU')},",
                       f"Run it on a CPU with VNNI or AMX, or rebuild it for this one: `ptqd calibrate {b.root} "
                       f"--weight-grid portable` then `ptqd build {b.root}`.")


def open_openvino(b, precision: str, threads: int | None = None):
    """A runner for one precision on OpenVINO (bucketed when the calibration has buckets)."""
    from ptqd.engines.openvino import OvRunner
    from ptqd.engines.runner import BucketedRunner

    if precision == "fp32":
        return OvRunner(b.path(layout.UNET_ONNX), threads)
    built = layout.built(b, "openvino")
    if precision not in built:
        raise UserError(f"{b.root} has no openvino engine for {precision}; build it with `ptqd build {b.root} "
                        f"--backend openvino --precisions {precision}` (available: "
                        f"{', '.join(['fp32'] + sorted(built))})")
    _check_cpu(b, precision, built[precision], "openvino")
    entries = built[precision]["buckets"]
    for e in entries:  # the IR's weights file is checked against the manifest too
        if not e["engine"].endswith(".xml.gz"):
            raise UserError(f"{b.root}: the openvino engine {e['engine']} predates this ptqd's format; rebuild it "
                            f"with `ptqd build {b.root} --backend openvino`")
        b.path(e["engine"].removesuffix(".xml.gz") + ".bin")
    fpp = built[precision].get("float_precision", "f32")  # bf16 only where this CPU has it (float_precision_here)
    if len(entries) == 1:
        return OvRunner(b.path(entries[0]["engine"]), threads, float_precision=fpp)
    return BucketedRunner([(tuple(e["t_range"]), OvRunner(b.path(e["engine"]), threads, float_precision=fpp))
                           for e in entries])


def open_tensorrt(b, precisions, cuda_graphs: bool = False):
    """One TrtEngineSet over the given precisions' engines (every timestep bucket), sharing one
    device-memory allocation: what a step-aware plan switches between. Engines are named
    ``<precision><suffix>`` (``w4a8``, or ``w4a8.b0``, ``w4a8.b1`` with buckets)."""
    from ptqd.engines.tensorrt import TrtEngineSet

    built = layout.built(b, "tensorrt")
    missing = [p for p in precisions if p not in built]
    if missing:
        raise UserError(f"{b.root} has no tensorrt engine for {', '.join(missing)}; build it with `ptqd build "
                        f"{b.root} --backend tensorrt --precisions {','.join(missing)}` (available: "
                        f"{', '.join(sorted(built)) or 'none'})")
    plans = {}
    for p in precisions:
        entries = built[p]["buckets"]
        for k, e in enumerate(entries):
            plans[f"{p}{layout.bucket_suffix(k, len(entries))}"] = b.path(e["engine"])
    return TrtEngineSet(plans, cuda_graphs=cuda_graphs)


def open_tensorrt_runner(b, precision: str):
    """A runner for one precision on TensorRT (bucketed when the calibration has buckets)."""
    from ptqd.engines.runner import BucketedRunner

    engines = open_tensorrt(b, [precision])
    entries = layout.built(b, "tensorrt")[precision]["buckets"]
    if len(entries) == 1:
        return engines.runner(precision)
    return BucketedRunner([(tuple(e["t_range"]), engines.runner(f"{precision}{layout.bucket_suffix(k, len(entries))}"))
                           for k, e in enumerate(entries)])


def open_decoder(b, threads: int | None = None):
    """The first-stage decoder's runner, or None when the bundle has none (samples stay latents)."""
    from ptqd.engines.onnxruntime import OrtDecoder

    return OrtDecoder(b.path(layout.FIRST_STAGE_ONNX), threads) if b.has(layout.FIRST_STAGE_ONNX) else None


def load_plan(b, spec: str) -> Plan:
    """A plan spec as a Plan: ``auto`` (calib/plan.json), a plan FILE.json, or one precision for every step."""
    if spec == "auto":
        if not b.has(layout.PLAN_JSON):
            raise UserError(f"{b.root} has no plan: run `ptqd compile` or `ptqd correct {b.root}` first")
        return Plan.from_json(b.read_json(layout.PLAN_JSON))
    if spec.endswith(".json"):
        try:
            return Plan.from_json(json.loads(Path(spec).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--plan {spec}: not a plan file ({e}); expected {{\"steps\": [{{\"t\": 951, "
                            f"\"precision\": \"w4a4\"}}, ...]}}") from None
    return Plan.fixed(spec)


def correction_parts(correction: str | tuple) -> tuple[str, ...]:
    """The parts a ``--correction`` mode (or an explicit tuple of parts) may apply."""
    if isinstance(correction, str):
        if correction not in MODE_PARTS:
            raise UserError(f"--correction must be {', '.join(CORRECTION_MODES[:-1])} or off, got {correction!r}")
        return MODE_PARTS[correction]
    return tuple(correction)


def step_engines(b, spec: str = "fp32", correction: str | tuple = "auto", threads: int | None = None,
                 cache: dict | None = None, backend: str = "onnxruntime"):
    """The runtime for a plan spec: ``auto`` (calib/plan.json), a precision, or a plan FILE.

    ``correction``: "auto" (the parts the end-to-end gate kept; nothing where it kept none or nothing was
    fitted), "on" (PTQD's raw fit), "conditional", "off", or a tuple of parts ("k", "bias", "vsc", "cond");
    every mode but auto and off needs a fit. Returns (engine for sample_latents, label). FP32 without
    correction is a plain runner."""
    pl = load_plan(b, spec)
    use = correction_parts(correction)
    tables = {}
    needs = [p for p in pl.precisions if p in CALIBRATED_NAMES]
    if use and needs:
        if not b.has(layout.CORRECTION_JSON):
            if correction != "auto":
                raise UserError(f"{b.root} has no fitted correction: run `ptqd correct {b.root}` (or "
                                "--correction off)")
        else:
            fitted = b.read_json(layout.CORRECTION_JSON)["precisions"]
            tables = {p: CorrectionTable.from_json(fitted[p], applied=correction == "auto") for p in needs
                      if p in fitted}
            if spec == "auto" and correction == "auto" and \
                    not b.read_json(layout.PLAN_JSON).get("correction_gate", {}).get("helps", True):
                for t in tables.values():  # the plan's gate: corrected was not better than uncorrected
                    t.parts = [()] * len(t.t)
            if "cond" in use and correction != "auto" and any(t.a is None for t in tables.values()):
                raise UserError(f"{b.root} has no conditional correction fit: rerun `ptqd correct {b.root}`")
    cache = {} if cache is None else cache  # precision -> runner, shared by the rows of an eval
    runners = {}
    for p in pl.precisions:
        if p not in cache:
            cache[p] = open_engine(b, p, threads, allow_spinning=False, backend=backend)
        runners[p] = cache[p]
    if not tables and len(pl.precisions) == 1:
        return runners[pl.precisions[0]], pl.precisions[0]
    label = "plan" if spec == "auto" else Path(spec).stem if spec.endswith(".json") else spec
    if tables and use:
        label += "+" + "+".join(use) if isinstance(correction, tuple) else MODE_LABELS[correction]
    return StepEngines(runners, pl, tables, use), label
