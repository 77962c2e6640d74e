"""``ptqd inspect``: what a bundle holds (model facts, MACs, layers, files, BOPs), checksums verified."""

from __future__ import annotations

import math
import os
import re
from typing import Any

from ptqd.bundle import Bundle, layout
from ptqd.stages.plan import bops_table


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
    if b.has(layout.UNET_LAYERS):
        table = b.read_json(layout.UNET_LAYERS)
        info["macs_per_forward"] = table["macs_per_forward"]
        info["macs_by_kind"] = table["macs_by_kind"]
        info["layer_count"] = table["layer_count"]
        info["weight_params"] = sum(math.prod(r["weight_shape"]) for r in table["layers"]
                                    if r["weight_shape"])
    export = b.stage("export")
    if export:
        info["export"] = export
    if export and export.get("outliers") and "macs_per_forward" in info:
        from ptqd.calib.calibrate import BRANCH_PATTERN

        branch = sum(r["macs"] for r in table["layers"] if r["module"] and re.search(BRANCH_PATTERN, r["module"]))
        counted = sum(r["macs"] for r in table["layers"] if r["kind"] in ("conv", "linear"))
        info["outliers"] = {**export["outliers"], "branch_macs_share": branch / max(counted, 1)}
    if b.has(layout.CORRECTION_JSON):  # older records: fitted on DDIM
        c = b.read_json(layout.CORRECTION_JSON)["config"]
        info["correction"] = {"sampler": c.get("sampler", "ddim"), "steps": c.get("steps"),
                              "trajectories": c.get("samples"), "held_out": c.get("holdout")}
    cal = b.stage("calibrate")
    if cal:
        cfg = cal.get("config", {})
        info["calibration"] = {"preset": cal.get("preset"), "method": cfg.get("method"),
                               "rounding": cfg.get("rounding"), "weight_grid": "portable ±63" if cfg.get(
                                   "reduce_range", True) else "full ±127",
                               "attention": cfg.get("attention", "float")}
    info["bops"] = bops_table(b)
    return info
