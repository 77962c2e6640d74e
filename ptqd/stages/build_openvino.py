"""``ptqd build --backend openvino``: one OpenVINO IR per calibrated precision (and timestep bucket),
converted from ptqd's QDQ graph with the conv outputs left in float (``engines.openvino.openvino_layers``:
what OpenVINO runs fastest; ONNX Runtime's engine requantizes them), 4-bit weights stored as i4, each
validated end to end against its fake-quant model. On request (``--precisions nncf-int8,nncf-mixed,nncf-hybrid``),
the peer a user would pick instead: NNCF's recipes on the exported graph, calibrated on the same recorded inputs,
so ``ptqd eval`` and ``ptqd bench`` can put them beside ptqd's engines. OpenVINO is imported only when a build
starts."""

from __future__ import annotations

import collections
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.engines.compare import Memo, validate_engine, validate_quantized, validation_inputs
from ptqd.errors import MissingDependencyError, UserError, ValidationError
from ptqd.precision import CALIBRATED, CALIBRATED_NAMES, OPENVINO_BUILDABLE, OV_PEERS, Precision
from ptqd.progress import progress_bar
from ptqd.resources import cpu_description
from ptqd.stages.common import (
    buildable_here,
    calib_attention,
    calib_layers,
    commit_build,
    load_source,
    require_calibrated,
)

# OpenVINO's int8 kernels are not visible from Python, so the kernel-level check the ONNX Runtime
# build runs (ptqd.engines.kernels) has no counterpart here: the engine is judged end to end only.
NO_KERNEL_CHECK = {"passed": True, "kernels": 0, "mismatched": [], "constant_mismatches": [],
                   "note": "not available on openvino: judged end to end against the fake-quant model"}


def numerics(p: Precision, attention: int = 0, float_precision: str = "f32") -> str:
    return (f"w{p.w_bits}a{p.a_bits}: ptqd's QDQ graph on OpenVINO's int8 kernels, conv outputs not requantized "
            f"(ONNX Runtime's engine requantizes them), float parts in {float_precision}"
            + (", 4-bit weights stored as i4" if p.w_bits == 4 else "")
            + (f", {attention} attention matmuls on 8-bit inputs" if attention else ", attention matmuls float"))


NNCF_ITEMS = 64  # calibration inputs for the NNCF peer, spread over the recorded steps


def float_choice(requested: str) -> tuple[str, str]:
    """(the float precision to build for, why) from ``--float-precision``: auto and bf16 take bf16 where this
    CPU computes it natively (auto only if :func:`check_bf16` then passes), f32 everywhere else."""
    from ptqd.engines.openvino import FLOAT_PRECISIONS
    from ptqd.resources import has_native_bf16

    if requested not in FLOAT_PRECISIONS:
        raise UserError(f"--float-precision {requested!r}: choose from {', '.join(FLOAT_PRECISIONS)}")
    if requested == "f32":
        return "f32", "asked for (--float-precision f32)"
    if not has_native_bf16():
        return "f32", f"this CPU ({cpu_description()}) has no native bf16 (avx512_bf16 or amx_bf16)"
    return "bf16", "this CPU computes bf16 natively" + (" (--float-precision bf16)" if requested == "bf16" else "")


def check_bf16(engine_f32, engine_bf16, fp, inputs: list[dict]) -> dict:
    """Whether running the float parts in bf16 keeps the engine as close to FP32 (``fp``, a runner) as its
    validated f32 run: passes when the bf16 run's median rel-L2 from FP32 on ``inputs`` is at most CASCADE_SLACK x
    the f32 run's (the allowance a rounding cascade gets in validation). ``engine_bf16`` is made (called with no
    arguments) only after the f32 outputs are in hand and ``engine_f32.release()``, where it has one, has run:
    the two compiled models are not held at once."""
    from ptqd.engines.compare import CASCADE_SLACK, rel_l2

    calls = [(f["x"], f["t"], f.get("context")) for f in inputs]
    f32 = [engine_f32(*args) for args in calls]
    if hasattr(engine_f32, "release"):
        engine_f32.release()
    bf16 = engine_bf16()
    e32, e16, d = [], [], []
    for args, a in zip(calls, f32):
        ref, c = fp(*args), bf16(*args)
        e32.append(rel_l2(a, ref))
        e16.append(rel_l2(c, ref))
        d.append(rel_l2(c, a))
    rec = {"f32_vs_fp32_median": float(np.median(e32)), "bf16_vs_fp32_median": float(np.median(e16)),
           "bf16_vs_f32_median": float(np.median(d)), "slack": CASCADE_SLACK, "inputs": len(inputs)}
    rec["passed"] = bool(rec["bf16_vs_fp32_median"] <= CASCADE_SLACK * rec["f32_vs_fp32_median"])
    return rec


def _open_params(precisions) -> tuple[Precision, ...]:
    names = [str(q) for q in OPENVINO_BUILDABLE]
    precisions = CALIBRATED_NAMES if precisions is None else tuple(str(p) for p in precisions)
    bad = [p for p in precisions if p not in names]
    if bad:
        raise UserError(f"unknown precision(s) {bad} for openvino; choose from {', '.join(names)} (ort-int8 is "
                        "ONNX Runtime's own quantizer: build it with --backend onnxruntime)")
    peers = [p for p in precisions if p in [q.value for q in OV_PEERS]]
    if peers:
        import importlib.util

        if importlib.util.find_spec("nncf") is None:
            raise MissingDependencyError(f"{', '.join(peers)} (NNCF + OpenVINO, the peer) needs NNCF: pip install "
                                         f"'ptqd[peers]', or leave {', '.join(peers)} out of --precisions")
    return tuple(Precision(p) for p in precisions)


def build_nncf_peer(b: Bundle, w, p: Precision, feeds: dict, val_inputs) -> dict:
    """NNCF's recipe ``p`` (nncf-int8: its default; nncf-mixed: mixed preset, transformer model type; nncf-hybrid:
    optimum-intel's hybrid mode) on the exported graph, on NNCF_ITEMS of the calibration's recorded UNet inputs
    (``feeds``), written into the transaction ``w``; its record for build.json. Not validated against a fake-quant model
    (ptqd has none of NNCF's numerics): its distance from FP32 on the validation inputs is recorded instead."""
    import nncf

    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.openvino import (
        NNCF_RECIPES,
        OvRunner,
        engine_bytes,
        nncf_quantize,
        openvino_default_precision,
        save_engine,
        shared_core,
    )

    items = min(NNCF_ITEMS, len(feeds["t"]))
    fpp = openvino_default_precision()  # what NNCF + OpenVINO gives a user here
    t0 = time.perf_counter()
    model = nncf_quantize(shared_core().read_model(str(b.path(layout.UNET_ONNX))), feeds, items, p.value)
    quantize_s = time.perf_counter() - t0
    rel, bin_rel = layout.ov_engine(p.value)
    w.file(bin_rel)  # detached from the live bundle before OpenVINO writes it
    files = save_engine(model, w.file(rel))
    xml = w.staging / rel
    entry = {"t_range": None, "engine": rel, "size_bytes": engine_bytes(xml)}
    rec: dict[str, Any] = {
        "numerics": f"{NNCF_RECIPES[p.value]} (nncf.quantize: its own quantizer placement and ranges) on "
                    f"{items} calibration inputs; 8-bit weights per channel; float parts in {fpp} (OpenVINO's "
                    "default on the building CPU)",
        "float_precision": fpp,
        "nncf": nncf.__version__, "calibration_items": items, "quantize_seconds": round(quantize_s, 1),
        "files": files, "buckets": [entry], "size_bytes": entry["size_bytes"], "i4_constants": 0,
        "built_on": cpu_description()}
    if val_inputs is not None:
        vs = validate_engine(OvRunner(xml, float_precision=rec["float_precision"]),
                             OrtRunner(b.path(layout.UNET_ONNX)), val_inputs)
        rec["vs_fp32"] = {k: vs[k] for k in ("median_rel_l2", "worst_rel_l2", "inputs")}
    return rec


def float_parts(want: str, why: str, requested: str, entries: list[dict]) -> dict:
    """The record of what an engine's float parts run in: ``want`` (:func:`float_choice`), kept as bf16 when
    every bucket's :func:`check_bf16` passed, or when bf16 was asked for by name or the checks were skipped
    (--no-validate)."""
    if want != "bf16":
        return {"float_precision": "f32", "float_precision_why": why}
    checks = [e["bf16_check"] for e in entries if "bf16_check" in e]
    if not checks:
        return {"float_precision": "bf16", "float_precision_why": why + "; not checked (--no-validate)"}
    worst = max(checks, key=lambda c: c["bf16_vs_fp32_median"] / max(c["f32_vs_fp32_median"], 1e-12))
    words = (f"bf16 rel-L2 from FP32 {worst['bf16_vs_fp32_median']:.3g} against f32's "
             f"{worst['f32_vs_fp32_median']:.3g} (limit {worst['slack']:g}x)")
    if all(c["passed"] for c in checks) or requested == "bf16":
        return {"float_precision": "bf16", "float_precision_why": f"{why}; {words}"}
    return {"float_precision": "f32", "float_precision_why": f"bf16 moved the engine away from FP32: {words}"}


# ``ptqd build --act-grid``: which 8-bit layer inputs an OpenVINO engine reads as int8 on a symmetric grid (no zero
# point; engines.openvino.openvino_layers), by the most it may widen the quantizer's step: signed, every input with
# negative values; mixed, those within 1.25x (the transformer blocks' inputs, 1.0-1.2x, not SiLU's outputs, 1.9x);
# unsigned, none (u8 with the calibrated zero points). signed and mixed also write every 4-bit input as int8 without
# a zero point, which holds its 16 levels exactly (write_qdq's signed_low_bits). Measured in docs/backend-openvino.md.
ACT_GRIDS = {"signed": float("inf"), "mixed": 1.25, "unsigned": 0.0}


def act_grid_choice(requested: str, isa: list[str] | None = None) -> tuple[str, str]:
    """(the grid to build, why) from ``--act-grid``: auto (the default) takes signed on a CPU with AMX-INT8, where
    the plugin's int8 kernels without a zero point are 1.1-1.2x faster, and unsigned elsewhere, where they are not
    (measured with AMX turned off, AVX-512 VNNI or AVX2 kernels: unsigned as fast or 2-5 % faster) and the u8 grids
    hold more of the demo's quality (docs/backend-openvino.md). The grids are chosen on the build machine; an
    engine computes the same numbers on any CPU."""
    if requested not in ACT_GRIDS and requested != "auto":
        raise UserError(f"--act-grid must be auto or one of {', '.join(ACT_GRIDS)}, got {requested!r}")
    if requested != "auto":
        return requested, "--act-grid " + requested
    from ptqd.resources import has_amx_int8

    if has_amx_int8(isa):
        return "signed", "auto: this CPU has AMX-INT8, whose int8 kernels run inputs without a zero point faster"
    return "unsigned", "auto: no AMX-INT8 on this CPU, where u8 inputs with a zero point run as fast"


def activation_grids(layers, low_bits_int8: bool = False) -> dict:
    """How many 8-bit layer inputs the engine reads as int8 on a symmetric grid, as u8 with a zero point, and how
    many 4-bit ones it reads as int8 without a zero point (``low_bits_int8``, ``write_qdq(signed_low_bits)``) or
    as u8 with one."""
    low = "4-bit int8" if low_bits_int8 else "4-bit u8"
    kinds = collections.Counter(low if lq.act_in.bits < 8 else "int8 symmetric" if lq.act_in.int8_symmetric
                                else "u8 zero point" if lq.act_in.zero_point else "u8" for lq in layers)
    return dict(sorted(kinds.items()))


@writes_bundle()
def build_openvino(bundle, precisions=None, validate: bool = True, progress: bool | None = None,
                   float_precision: str = "auto", act_grid: str = "auto") -> dict:
    """OpenVINO engines from the calibration; each validated against its fake-quant model (in f32).
    ``float_precision`` (auto, bf16, f32): what the engines' float parts run in; see :func:`float_choice` and
    :func:`check_bf16`. ``act_grid`` (:data:`ACT_GRIDS`, or auto: :func:`act_grid_choice`): which 8-bit inputs go
    on symmetric int8 grids. NNCF's
    peers get what OpenVINO gives them by default on this CPU."""
    from ptqd.engines.openvino import OvRunner, convert_qdq, engine_bytes, openvino_layers, require_openvino
    from ptqd.engines import graph_opt
    from ptqd.engines.qdq import write_qdq

    act_grid, act_grid_why = act_grid_choice(act_grid)
    ov = require_openvino()
    precisions = _open_params(precisions)
    want, why = float_choice(float_precision)
    fp_ref = None  # FP32 on the validation inputs (a Memo), for the cascade verdicts and the bf16 checks
    b = Bundle.open(bundle)
    require_calibrated(b)
    requires = buildable_here(b)
    graph_opt.prepare(b.path(layout.UNET_ONNX))  # shapes for the one-key attention rewrite, before the models load
    # the peers first, before the torch model for the validation is loaded: their peaks do not add up
    precisions = tuple(sorted(precisions, key=lambda p: p not in OV_PEERS))
    loaded = None  # loaded at the first validation
    feeds = dict(np.load(b.path(layout.CALIB_FEEDS))) if validate or any(p in OV_PEERS for p in precisions) else None
    val_inputs = validation_inputs(feeds) if validate else None
    records: dict[str, Any] = {}
    calib_buckets = layout.calib_buckets(b)
    old = layout.built(b, "openvino")
    with progress_bar(len(precisions), "build openvino", progress) as bar, Bundle.transaction(b.root) as w, \
            tempfile.TemporaryDirectory(prefix="ptqd-ov-") as tmp:
        for p in precisions:
            t0 = time.perf_counter()
            bar.set_postfix_str(p.value)
            for rel in w.listed(f"{layout.OV_DIR}/{p.value}."):
                w.remove(rel)  # a rebuild replaces every bucket's engine of this precision
            if p in OV_PEERS:
                records[p.value] = build_nncf_peer(b, w, p, feeds, val_inputs)
                records[p.value]["build_seconds"] = round(time.perf_counter() - t0, 1)
                bar.update()
                continue
            rec: dict[str, Any] = {"numerics": numerics(p), "conv_outputs": "float", "openvino": ov.__version__,
                                   "buckets": [],
                                   "built_on": cpu_description(), **({"requires": requires} if requires else {})}
            for k, bucket in enumerate(calib_buckets if p in CALIBRATED else [None]):
                layers = openvino_layers(calib_layers(b, p.value, k, len(calib_buckets)), ACT_GRIDS[act_grid])
                attention = calib_attention(b, p.value, k, len(calib_buckets))
                if attention:
                    rec["attention_matmuls_int8"] = len(attention)
                    rec["numerics"] = numerics(p, len(attention))
                qdq = Path(tmp) / f"{p.value}.{k}.qdq.onnx"
                # attention's Q/DQ where q/k/v and P are made (OpenVINO fuses them into their producers), and a
                # layer's input Q/DQ above the Reshape/Transpose that feed it (proj_out): the same values as on
                # the inputs, with int8 moving through the Transposes (ptqd.engines.qdq.write_qdq)
                fp = b.path(layout.UNET_ONNX)
                wrote = write_qdq(fp, layers, qdq, attention=attention, attention_at="source", signed=True,
                                  inputs_at="source", signed_low_bits=act_grid != "unsigned",
                                  rewrite=lambda m, fp=fp: graph_opt.optimize_for_openvino(m, fp))
                if k == 0:
                    rec["graph_rewrites"] = wrote["graph"]
                    rec["inputs_moved_to_source"] = wrote["inputs_moved_to_source"]
                    rec["act_grid"], rec["act_grid_why"] = act_grid, act_grid_why
                    rec["activation_grids"] = activation_grids(layers, act_grid != "unsigned")
                rel, bin_rel = layout.ov_engine(p.value, k, len(calib_buckets))
                w.file(bin_rel)  # detached from the live bundle before OpenVINO writes it
                packed = convert_qdq(qdq, w.file(rel))
                qdq.unlink()
                xml = w.staging / rel
                entry = {"t_range": bucket["t_range"] if bucket else None, "engine": rel,
                         "size_bytes": engine_bytes(xml), **packed}
                if validate:
                    from ptqd.calib.fakequant import fake_quant_model
                    from ptqd.engines.onnxruntime import OrtRunner
                    from ptqd.engines.torch_ref import TorchRunner

                    if loaded is None:
                        loaded = load_source(b)
                    ref = TorchRunner(fake_quant_model(loaded.unet, layers, attention))
                    if fp_ref is None:  # FP32's outputs, computed once per build for every check that reads them
                        fp_ref = Memo(lambda: OrtRunner(b.path(layout.UNET_ONNX)))
                    engine = Memo(lambda xml=xml: OvRunner(xml))  # f32: the fake-quant model's numerics
                    val = validate_quantized(engine, ref, lambda: fp_ref, NO_KERNEL_CHECK, val_inputs, p.a_bits)
                    entry["validation_vs_fake_quant"] = val
                    del ref  # the fake-quant model: not held while the bf16 copy compiles
                    if not val["passed"]:
                        raise ValidationError("openvino engine vs fake-quant model",
                                              f"{p.value}{layout.bucket_suffix(k, len(calib_buckets))}: "
                                              f"{val['failure']}")
                    if want == "bf16":
                        entry["bf16_check"] = check_bf16(
                            engine, lambda xml=xml: OvRunner(xml, float_precision="bf16"), fp_ref, val_inputs)
                    del engine
                    fp_ref.release()  # its outputs stay
                rec["buckets"].append(entry)
            rec.update(float_parts(want, why, float_precision, rec["buckets"]))
            rec["numerics"] = numerics(p, rec.get("attention_matmuls_int8", 0), rec["float_precision"])
            first = rec["buckets"][0]
            rec.update(size_bytes=first["size_bytes"], i4_constants=first["i4_constants"])
            if "validation_vs_fake_quant" in first:
                rec["validation_vs_fake_quant"] = first["validation_vs_fake_quant"]
            rec["build_seconds"] = round(time.perf_counter() - t0, 1)
            records[p.value] = rec
            bar.update()
        commit_build(w, b, "openvino", "build_openvino", old, records)
    return records
