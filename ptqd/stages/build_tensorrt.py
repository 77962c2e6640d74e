"""``ptqd build --backend tensorrt``: TensorRT-conformant QDQ graphs per precision, linted on the CPU,
built into serialized plans through polygraphy, validated against ONNX Runtime on the same graph; and
``ptqd lint``, the same graphs checked against TensorRT's rules without a GPU. TensorRT itself is
imported only when a build starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.engines.compare import validate_engine, validation_inputs
from ptqd.errors import InternalError, UserError, ValidationError
from ptqd.precision import TENSORRT_BUILDABLE, Precision
from ptqd.progress import progress_bar
from ptqd.stages.common import calib_layers

TRT_PRECISIONS = tuple(p.value for p in TENSORRT_BUILDABLE)  # fp16: the unquantized baseline engine
TRT_DIR = layout.TRT_DIR
# TensorRT engine (GPU, FP16 kernels) vs ONNX Runtime running the same QDQ graph on the CPU, rel-L2
# of ε per timestep, by activation bits (16: the fp16 engine). Provisional until confirmed on GPUs
# (scripts/tensorrt_gpu_check.py prints the measured errors): FP16 rounding alone moves the ONNX
# Runtime output of these graphs by 1e-2 (8-bit activations) and 8e-2 (4-bit) rel-L2 on the demo.
TRT_TOLERANCE = {16: (5e-3, 1e-2), 8: (3e-2, 6e-2), 4: (1.5e-1, 2.5e-1)}  # (median, worst)


def _tensorrt_graphs(b: Bundle, precisions, path_for, options) -> list[tuple]:
    """Write the TensorRT QDQ graph of each precision (each timestep bucket) from the calibration.
    ``path_for(file name) -> Path``. Returns [(precision, suffix, bucket, path, writer record)]."""
    from ptqd.engines.tensorrt import write_qdq_tensorrt

    bad = [p for p in precisions if p not in TRT_PRECISIONS]
    if bad:
        raise UserError(f"unknown precision(s) {bad} for tensorrt; choose from {', '.join(TRT_PRECISIONS)}")
    if b.stage("calibrate") is None and any(p != "fp16" for p in precisions):
        raise UserError(f"{b.root} is not calibrated: run `ptqd calibrate {b.root}` first")
    attention = (b.stage("calibrate") or {}).get("config", {}).get("attention", "float")
    if attention != "float" and any(p != "fp16" for p in precisions):
        raise UserError(f"{b.root} is calibrated with --attention {attention}, and TensorRT's graphs keep attention "
                        "float: its correction and plan were fitted to numerics TensorRT would not compute. "
                        f"Recalibrate with `ptqd calibrate {b.root} --attention float` for TensorRT engines")
    buckets = (b.stage("calibrate") or {}).get("buckets") or [None]
    out = []
    for p in precisions:
        for k, bucket in enumerate([None] if p == "fp16" else buckets):
            sfx = "" if p == "fp16" else layout.bucket_suffix(k, len(buckets))
            layers = [] if p == "fp16" else calib_layers(b, p, k, len(buckets))
            layers = [lq for lq in layers if lq.op in ("Conv", "MatMul")]  # embedding Gemms: TensorRT keeps them fp32
            path = path_for(f"{p}{sfx}.qdq.onnx")
            out.append((p, sfx, bucket, path, write_qdq_tensorrt(b.path(layout.UNET_ONNX), layers, path, options)))
    return out


@writes_bundle()
def build_tensorrt(bundle, precisions=None, validate: bool = True, progress: bool | None = None,
                    options=None) -> dict:
    """One TensorRT plan per precision (and timestep bucket) from TensorRT-conformant QDQ graphs:
    each graph is linted on the CPU before it is built, each engine validated against ONNX Runtime
    running the same graph. The timing cache lives in the bundle and is reused by every build."""

    from ptqd.engines.tensorrt.lint import lint_qdq
    from ptqd.engines.tensorrt import (
        TIMING_CACHE,
        TrtEngineSet,
        TrtOptions,
        build_engine,
        build_spec,
        graph_inputs,
        numerics_summary,
        profile_shapes,
        require_tensorrt,
    )
    from ptqd.engines.onnxruntime import OrtRunner

    require_tensorrt()  # before any work: one line saying what to install
    precisions = TRT_PRECISIONS if precisions is None else tuple(precisions)
    options = options or TrtOptions()
    options.validate()
    b = Bundle.open(bundle)
    old = layout.built(b, "tensorrt")
    cache_rel = f"{TRT_DIR}/{TIMING_CACHE}"
    cache_bytes = b.read_bytes(cache_rel) if b.has(cache_rel) else b""
    records: dict[str, Any] = {}
    with progress_bar(len(precisions), "build tensorrt", progress) as bar, Bundle.transaction(b.root) as w:
        cache = w.file(cache_rel)
        cache.write_bytes(cache_bytes)  # polygraphy reads it, then merges the new timings into it
        spec = None
        for p in precisions:
            bar.set_postfix_str(p)
            for rel in w.listed(f"{TRT_DIR}/{p}."):
                w.remove(rel)  # a rebuild replaces every bucket of this precision
            rec: dict[str, Any] = {"buckets": []}
            for _, sfx, bucket, qdq, graph in _tensorrt_graphs(b, [p], lambda name: w.file(f"{TRT_DIR}/{name}"),
                                                              options):
                findings = lint_qdq(qdq)
                if findings:  # the writer's job is to make conformant graphs: a ptqd bug
                    raise InternalError(f"{qdq.name} breaks {len(findings)} TensorRT rule(s), first: {findings[0]}")
                if spec is None:
                    spec = build_spec(options, profile_shapes(graph_inputs(qdq), options), cache)
                plan = w.file(f"{TRT_DIR}/{p}{sfx}.plan")
                desc = build_engine(qdq, plan, spec)
                entry = {"t_range": bucket["t_range"] if bucket else None,
                         "engine": plan.relative_to(w.staging).as_posix(),
                         "qdq_graph": qdq.relative_to(w.staging).as_posix(),
                         "size_bytes": desc["size_bytes"], "device_memory_bytes": desc["device_memory_bytes"],
                         "layer_precisions": desc["layer_precisions"]}
                if validate:
                    bits = Precision(p).a_bits
                    with TrtEngineSet({p: plan}) as engines:
                        val = validate_engine(engines.runner(p), OrtRunner(qdq), validation_inputs(dict(np.load(b.path(layout.CALIB_FEEDS)))), act_bits=bits)
                    med, worst = TRT_TOLERANCE[bits]
                    val.update(reference="onnxruntime on the same QDQ graph",
                               tolerance={"median_rel_l2": med, "worst_rel_l2": worst},
                               passed=val["median_rel_l2"] <= med and val["worst_rel_l2"] <= worst)
                    entry["validation_vs_onnxruntime"] = val
                    if not val["passed"]:
                        raise ValidationError("TensorRT engine vs ONNX Runtime", f"{p}{sfx} TensorRT engine does not match ONNX Runtime on its own graph: "
                                          f"rel-L2 median {val['median_rel_l2']:.3g}, worst {val['worst_rel_l2']:.3g} "
                                          f"(tolerance {med:g} / {worst:g})")
                if not rec["buckets"]:
                    rec.update({"numerics": numerics_summary(graph), "tensorrt": desc["tensorrt"], "gpu": desc["gpu"],
                                "graph": {k: v for k, v in graph.items() if k != "per_layer"},
                                "per_layer_graph": graph["per_layer"], "per_layer_engine": desc["per_layer"],
                                "layer_precisions": desc["layer_precisions"], "size_bytes": desc["size_bytes"],
                                "build_config": {**spec, "timing_cache": cache_rel}})
                rec["buckets"].append(entry)
            records[p] = rec
            bar.update()
        merged = {**old, **records}
        w.write_json(layout.TRT_BUILD_JSON, merged)
        w.set_stage("build_tensorrt", {"backend": "tensorrt", "precisions": sorted(merged),
                                       "tensorrt": next(iter(records.values()))["tensorrt"] if records else None})
    return records


def lint(bundle, target: str = "tensorrt") -> dict[str, list]:
    """Check each precision's QDQ graph against ``target``'s rules, on the CPU.

    Lints the built graphs when the bundle has a tensorrt build; otherwise writes, into a temporary
    directory, exactly the graphs `ptqd build --backend tensorrt` would build from the calibration.
    Returns {graph name: [Finding]} (empty lists: conformant)."""
    import tempfile

    from ptqd.engines.tensorrt.lint import TARGETS, lint_bundle, lint_qdq
    from ptqd.engines.tensorrt import TrtOptions

    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    b = Bundle.open(bundle)
    if any(rel.startswith(f"{TRT_DIR}/") and rel.endswith(".qdq.onnx") for rel in b.files):
        return lint_bundle(b.root, target)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = _tensorrt_graphs(b, TRT_PRECISIONS, lambda name: Path(tmp) / name, TrtOptions())
        return {f"{p}{sfx}": lint_qdq(path, target) for p, sfx, _, path, _ in graphs}
