"""``ptqd pack``: a deployable bundle with only what the runtime needs for one precision (or the step-aware
plan) on one backend: those engines, the decoder, the conditioning (class table, or text encoder,
tokenizer and prompt table), the correction and the plan, and a manifest with every file's sha256.

It is a bundle like any other for ``ptqd sample``, ``inspect`` and the runtime. What it dropped (the FP32
graph, the calibration, other engines) is named by one line when a command asks for it
(:meth:`ptqd.bundle.Bundle.path` reads the ``pack`` record)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.precision import Backend, Precision

# what sampling reads besides the engines, where the bundle has it
RUNTIME_FILES = (layout.UNET_LAYERS, layout.FIRST_STAGE_ONNX, layout.CLASS_EMBEDDING, layout.PROMPT_TABLE,
                 layout.PROMPTS_JSON, layout.TEXT_ENCODER_ONNX, layout.TOKENIZER_JSON, layout.TOKENIZER_CONFIG,
                 layout.TOKENIZER_2_JSON, layout.TOKENIZER_2_CONFIG,
                 layout.CORRECTION_JSON)


def engine_files(b: Bundle, backend: Backend, entry: dict) -> list[str]:
    """One built engine's files: the engine, and what it reads beside it (ONNX external data the graph
    points at; OpenVINO's weights ``.bin``)."""
    rel = entry["engine"]
    if backend == Backend.OPENVINO:
        return [rel, rel.removesuffix(".xml.gz") + ".bin"]
    if backend == Backend.ONNXRUNTIME:
        import onnx

        from ptqd.engines.onnxruntime import external_data_files

        graph = onnx.load(str(b.path(rel)), load_external_data=False).graph
        folder = rel.rsplit("/", 1)[0]
        return [rel, *sorted(f"{folder}/{loc}" for loc in external_data_files(graph))]
    return [rel]


@writes_bundle("out", create=True)
def pack(bundle, out, plan: str = "auto", backend: str = "onnxruntime") -> dict[str, Any]:
    """Write to ``out`` a bundle with only what sampling ``plan`` ("auto": the bundle's step-aware plan;
    a precision; fp32) on ``backend`` needs. Returns the file list and sizes of both bundles."""
    b = Bundle.open(bundle)
    be = Backend.parse(backend)
    if Path(out).resolve() == b.root.resolve():
        raise UserError("--out must be a new directory, not the bundle being packed")
    files: set[str] = {rel for rel in RUNTIME_FILES if b.has(rel)}
    if plan == "auto":
        if not b.has(layout.PLAN_JSON):
            raise UserError(f"{b.root} has no step-aware plan: run `ptqd plan {b.root}` (or `ptqd compile`), or "
                            "pack one precision with --plan w4a8")
        files.add(layout.PLAN_JSON)
        precisions = sorted({s["precision"] for s in b.read_json(layout.PLAN_JSON)["steps"]})
    else:
        precisions = [Precision.parse(plan, what="--plan").value]
    built: dict[str, Any] = {}
    for p in precisions:
        if p == "fp32":
            if be != Backend.ONNXRUNTIME and be != Backend.OPENVINO:
                raise UserError(f"fp32 is not an engine on {be}; pack --backend onnxruntime or openvino")
            files |= {rel for rel in b.files if rel == layout.UNET_ONNX or rel.startswith(layout.UNET_ONNX + ".")}
            continue
        have = layout.built(b, be)
        if p not in have:
            raise UserError(f"{b.root} has no {p} engine on {be}: build it with `ptqd build {b.root} --backend {be} "
                            f"--precisions {p}` (built: {', '.join(sorted(have)) or 'none'})")
        built[p] = have[p]
        for e in have[p].get("buckets") or [{"engine": layout.ort_engine(p)[1]}]:
            files.update(engine_files(b, be, e))
    stages = {k: v for k, v in b.manifest.get("stages", {}).items() if k in ("export", "calibrate", "correct", "plan")}
    record = {"from": str(b.root), "plan": plan, "backend": str(be), "precisions": precisions}
    with Bundle.transaction(out, create=True) as w:
        for rel in sorted(files):
            shutil.copyfile(b.path(rel), w.file(rel))
        if built:
            w.write_json(layout.build_json(be), built)
        w.set_model(b.manifest["model"])
        for name, rec in stages.items():
            w.set_stage(name, rec)
        if built:
            w.set_stage({"onnxruntime": "build"}.get(str(be), f"build_{be}"), {"backend": str(be),
                                                                               "precisions": sorted(built)})
        w.set_stage("pack", record)
    packed = Bundle.open(out)
    return {**record, "files": len(packed.files), "size_bytes": sum(r["size"] for r in packed.files.values()),
            "source_size_bytes": sum(r["size"] for r in b.files.values())}
