"""``ptqd demo``: the built-in demo model end to end (compile, a grid sampled with the plan, and the table
of every engine against FP); ``ptqd train-demo`` retrains its shipped weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ptqd.bundle import Bundle, layout
from ptqd.errors import PtqdError
from ptqd.precision import ORT_BUILDABLE
from ptqd.runtime.generate import sample
from ptqd.stages.compile import compile as compile_model
from ptqd.tools.bench import unet_latency
from ptqd.tools.evaluate import evaluate

DEMO_PRECISIONS = tuple(p.value for p in ORT_BUILDABLE)
DEMO_ROWS = (("ort-int8", "off"), ("w8a8", "off"), ("w8a8", "auto"), ("w4a8", "off"), ("w4a8", "auto"),
             ("w4a4", "off"), ("w4a4", "auto"), ("auto", "auto"))


def demo(out: str | os.PathLike = "demo-out", num: int = 500, seed: int = 0, steps: int = 20, eta: float = 0.0,
         guidance: float = 3.0, progress: bool | None = None, log=print) -> dict[str, Any]:
    """The demo end to end: compile the demo model (reusing finished stages), sample a grid with the
    mixed-precision plan, and evaluate every engine and the plan against FP on the same seeds."""

    out = Path(out)
    bundle = out / "demo.bundle"
    comp = compile_model("demo", bundle, precisions=DEMO_PRECISIONS, progress=progress, log=log)
    grid_path = out / "samples.png"
    sample(bundle, classes=list(range(10)), num=40, seed=seed, steps=steps, eta=eta, guidance=guidance,
           out=grid_path, precision="auto", progress=progress)
    report = evaluate(bundle, rows=list(DEMO_ROWS), num=num, seed=seed, steps=steps, eta=eta, guidance=guidance,
                      progress=progress)
    b = Bundle.open(bundle)
    cfg_x = 2 if b.facts.conditioning.guided else 1
    lat = unet_latency(b, DEMO_PRECISIONS, batch=cfg_x)
    # speed where the demo shows it: the sampler's real batch (evaluate's 100 images, CFG-doubled)
    real = unet_latency(b, DEMO_PRECISIONS, batch=100 * cfg_x, runs=5, warmup=1)
    plan_steps = b.read_json(layout.PLAN_JSON)["steps"]
    for row in report["rows"]:
        p = row["precision"].split("+")[0]
        if p in lat:
            row["unet_ms"] = lat[p]["median_ms"]
            row["images_per_s"] = 100 / (steps * real[p]["median_ms"] / 1e3)
        elif p == "plan":  # the plan's engines, weighted by the steps each runs
            row["unet_ms"] = sum(lat[s["precision"]]["median_ms"] for s in plan_steps) / len(plan_steps)
            row["images_per_s"] = 100 / sum(real[s["precision"]]["median_ms"] / 1e3 for s in plan_steps)
    return {"bundle": str(bundle), "stages": comp["stages"], "plan": comp["plan"], "grid": str(grid_path),
            "eval": report, "latency": lat, "openvino": openvino_throughput(bundle, steps, cfg_x)}


def openvino_throughput(bundle, steps: int, cfg_x: int) -> dict | None:
    """Where OpenVINO is installed: build the demo's OpenVINO engines (reused when built) and measure their
    images/s at the sampler's batch, against ONNX Runtime FP32 in the same rounds (None without OpenVINO)."""
    import importlib.util

    from ptqd.runtime.loader import open_engine
    from ptqd.stages.build import build
    from ptqd.stages.common import reusable

    if importlib.util.find_spec("openvino") is None:
        return None
    b = Bundle.open(bundle)
    precs = ("w8a8", "w4a8", "w4a4")
    try:
        if not reusable(b, "build_openvino", layout.BUILD_INPUTS) or not set(precs) <= set(layout.built(b, "openvino")):
            build(bundle, backend="openvino", progress=False)
            b = Bundle.open(bundle)
        runners = {f"{p}@openvino": open_engine(b, p, backend="openvino") for p in precs}
        runners["fp32"] = open_engine(b, "fp32", allow_spinning=False)
        real = unet_latency(b, list(runners), batch=100 * cfg_x, runs=5, warmup=1, runners=runners)
    except PtqdError as e:  # an optional backend never fails the demo: it says why it is missing
        return {"error": str(e)}
    return {p: {"images_per_s": 100 / (steps * v["median_ms"] / 1e3), "vs_ort_fp32": v["speedup_vs_fp32"]}
            for p, v in real.items() if p != "fp32"}


def train_demo(out: str | os.PathLike | None = None, seed: int = 0, progress: bool | None = None) -> dict[str, Any]:
    """Retrain the demo model and classifier (about 20 minutes on 2 cores); default: over the shipped weights."""
    from ptqd.models.demo import demo_dir, train_demo as train

    return train(Path(out) if out else demo_dir(), seed=seed, progress=progress)
