"""The Python API: one function per stage. The CLI is a thin shell over these."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

from ptqd.bundle import Bundle
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
    from ptqd.exporter.validate import seeded_unet_inputs
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
        record: dict[str, Any] = {"source": str(model), "opset": opset, "exporter": exporter, "inputs": ["x", "t"]}
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
            w.set_model(loaded.facts.to_json())
            w.set_stage("export", record)
        bar.set_postfix_str("done")
    return record


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
    return info
