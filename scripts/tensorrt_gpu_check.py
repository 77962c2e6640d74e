#!/usr/bin/env python
"""TensorRT on a GPU: build the engines, compare them with ONNX Runtime, benchmark them against FP16.

    python scripts/tensorrt_gpu_check.py [BUNDLE] [--work DIR] [--batch 8] [--iters 50] [--cuda-graphs]

For each precision (the unquantized FP16 baseline and every calibrated one) it
  1. writes the TensorRT QDQ graph from the bundle's calibration and lints it (CPU rules),
  2. builds a strongly typed TensorRT plan (polygraphy loaders, timing cache shared by all builds),
  3. compares the engine with ONNX Runtime running the *same* graph on the CPU, through polygraphy's
     Comparator (and our own rel-L2), and reports the error against the FP32 export too,
  4. times one UNet call at the CFG-doubled batch with all engines sharing one device-memory
     allocation (TrtEngineSet), and prints the speed-up over the FP16 engine.
It prints one table and writes everything to DIR/report.json. The bundle is not modified: graphs,
plans and the timing cache go to --work. Without BUNDLE it exports and calibrates the demo into
--work first (a few minutes on the CPU).

Needs an NVIDIA GPU with TensorRT and polygraphy: pip install tensorrt polygraphy.
Times include the host<->device copies of x, t, context and eps (that is what a sampler pays).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / max(np.linalg.norm(b.astype(np.float64)), 1e-12))


def _feeds(b, n: int, calls: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Seeded UNet inputs as a sampler with guidance sends them: n samples + their n unconditional
    twins (null class), timesteps spread over the schedule."""
    from ptqd import api

    facts = b.facts
    rng = np.random.RandomState(seed)
    table = np.load(b.path(api.CLASS_EMBEDDING)) if b.has(api.CLASS_EMBEDDING) else None
    out = []
    for i in range(calls):
        x = rng.standard_normal((n,) + tuple(facts.latent_shape)).astype(np.float32)
        t = np.full(n, np.linspace(1, facts.schedule.num_train_timesteps - 1, calls)[i], np.float32)
        f = {"x": np.concatenate([x, x]), "t": np.concatenate([t, t])}
        if table is not None:
            labels = api.default_labels(facts, None, n)  # every class but the null one, cycled
            rows = np.concatenate([table[labels], table[np.full(n, facts.conditioning.null_class)]])
            f["context"] = rows[:, None, :].astype(np.float32)
        out.append(f)
    return out


def _prepare_bundle(bundle: str | None, work: Path) -> Path:
    from ptqd import api

    if bundle:
        return Path(bundle)
    d = work / "demo.bundle"
    if not (d / "manifest.json").exists():
        print(f"exporting and calibrating the demo into {d} ...", flush=True)
        api.export("demo", d, progress=False)
        api.calibrate(d, progress=False)
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", nargs="?", help="a calibrated bundle (default: the demo, exported into --work)")
    p.add_argument("--work", default="trt-check", help="directory for graphs, plans, timing cache, report")
    p.add_argument("--precisions", default=None, help="comma-separated (default: fp16 and every calibrated one)")
    p.add_argument("--batch", type=int, default=8, help="samples per call; the UNet sees twice as many (CFG)")
    p.add_argument("--iters", type=int, default=50, help="timed calls per engine (after 5 warm-up calls)")
    p.add_argument("--compare-calls", type=int, default=4, help="input sets for the comparison (default 4)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each engine as a captured CUDA graph")
    args = p.parse_args(argv)

    from ptqd.errors import PtqdError

    try:
        return _run(args)
    except PtqdError as e:
        print(f"tensorrt_gpu_check: error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    from ptqd.engines.tensorrt import require_tensorrt

    trt = require_tensorrt()  # one line saying what to install, before any work

    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes
    from polygraphy.backend.trt import TrtRunner as PolyTrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.calib.calibrate import PRECISIONS, load_params
    from ptqd.engines.tensorrt.lint import lint_qdq
    from ptqd.engines.tensorrt import (
        TrtEngineSet,
        TrtOptions,
        build_engine,
        build_spec,
        gpu_info,
        graph_inputs,
        profile_shapes,
        write_qdq_tensorrt,
    )
    from ptqd.engines.onnxruntime import ort_session

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    b = Bundle.open(_prepare_bundle(args.bundle, work))
    calibrated = [q for q in PRECISIONS if b.has(f"calib/{q}.json") or b.has(f"calib/{q}.b0.json")]
    precisions = args.precisions.split(",") if args.precisions else ["fp16"] + calibrated
    options = TrtOptions(opt_batch=args.batch, max_batch=args.batch, cfg=True)
    cache = work / "timing.cache"
    gpu = gpu_info()
    print(f"TensorRT {trt.__version__} on {gpu.get('name')} (compute {gpu.get('compute_capability')}); "
          f"bundle {b.root}; UNet batch {2 * args.batch} ({args.batch} samples x CFG)", flush=True)

    rows, plans, spec = {}, {}, None
    for q in precisions:
        sfx = "" if q == "fp16" or b.has(f"calib/{q}.json") else ".b0"  # bucketed calibration: first bucket
        layers = [] if q == "fp16" else load_params(b.read_json(f"calib/{q}{sfx}.json"),
                                                    np.load(b.path(f"calib/{q}{sfx}.npz")))
        graph = work / f"{q}.qdq.onnx"
        rec = write_qdq_tensorrt(b.path(api.UNET_ONNX), layers, graph, options)
        findings = lint_qdq(graph)
        if findings:
            print(f"{q}: the TensorRT graph breaks {len(findings)} rule(s), first: {findings[0]}", file=sys.stderr)
            return 1
        if spec is None:
            spec = build_spec(options, profile_shapes(graph_inputs(graph), options), cache)
        plans[q] = work / f"{q}.plan"
        print(f"building {q} ...", flush=True)
        desc = build_engine(graph, plans[q], spec)
        rows[q] = {"graph": str(graph), "bucket": sfx or None, "writer": {k: v for k, v in rec.items() if k != "per_layer"},
                   "engine": {k: v for k, v in desc.items() if k != "per_layer"}}

    # ---- accuracy: TensorRT vs ONNX Runtime on the same graph (polygraphy Comparator) -------------
    feeds = _feeds(b, args.batch, args.compare_calls)
    fp32 = ort_session(b.path(api.UNET_ONNX))
    fp32_out = [fp32.run(["eps"], f)[0] for f in feeds]
    for q in precisions:
        ort_runner = OnnxrtRunner(SessionFromOnnx(rows[q]["graph"], providers=["cpu"]), name=f"onnxrt-{q}")
        trt_runner = PolyTrtRunner(EngineFromBytes(BytesFromPath(str(plans[q]))), name=f"trt-{q}")
        results = Comparator.run([ort_runner, trt_runner], data_loader=feeds)
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(rtol=5e-2, atol=5e-2, check_error_stat="median"))
        ort_out = [it["eps"] for it in results[ort_runner.name]]
        trt_out = [it["eps"] for it in results[trt_runner.name]]
        rows[q]["vs_onnxruntime"] = {
            "comparator_passed": bool(accuracy),
            "rel_l2": max(_rel(a, r) for a, r in zip(trt_out, ort_out)),
            "max_abs": max(float(np.abs(a - r).max()) for a, r in zip(trt_out, ort_out)),
        }
        rows[q]["vs_fp32_rel_l2"] = max(_rel(a, r) for a, r in zip(trt_out, fp32_out))

    # ---- speed: all engines in one TrtEngineSet, one shared scratch allocation ---------------------
    f = feeds[0]
    with TrtEngineSet(plans, cuda_graphs=args.cuda_graphs) as engines:
        for q in precisions:
            runner = engines.runner(q)
            for _ in range(5):
                runner(f["x"], f["t"], f.get("context"))
            times = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                runner(f["x"], f["t"], f.get("context"))
                times.append(time.perf_counter() - t0)
            rows[q]["ms_per_call"] = 1e3 * statistics.median(times)
        shared = engines.device_memory_bytes
        fallback = dict(engines.graph_fallback)
    separate = sum(r["engine"]["device_memory_bytes"] for r in rows.values())
    base = rows.get("fp16", {}).get("ms_per_call")

    head = (f"{'precision':<10}{'plan MB':>8}{'build s':>8}  {'int8/int4/fp16/fp32 layers':<27}{'vs ORT rel-L2':>14}"
            f"{'max|d|':>9}  {'Comparator':<11}{'vs FP32':>9}{'ms/call':>9}{'x fp16':>8}")
    print("\n" + head)
    for q, r in rows.items():
        lp = r["engine"]["layer_precisions"]
        mix = "/".join(str(lp.get(k, 0)) for k in ("int8", "int4", "fp16", "fp32"))
        v = r["vs_onnxruntime"]
        speed = f"{base / r['ms_per_call']:8.2f}" if base else f"{'-':>8}"
        print(f"{q:<10}{r['engine']['size_bytes'] / 1e6:8.1f}{r['engine']['build_seconds']:8.1f}  {mix:<27}"
              f"{v['rel_l2']:14.2e}{v['max_abs']:9.1e}  {'pass' if v['comparator_passed'] else 'FAIL':<11}"
              f"{r['vs_fp32_rel_l2']:9.2e}{r['ms_per_call']:9.2f}{speed}")
    print(f"shared device memory: {shared / 1e6:.1f} MB for {len(plans)} engines "
          f"(one context each would hold {separate / 1e6:.1f} MB); CUDA graphs "
          f"{'on' if args.cuda_graphs else 'off'}" + (f", fell back for {sorted(fallback)}" if fallback else ""))
    report = {"tensorrt": trt.__version__, "gpu": gpu, "bundle": str(b.root), "batch": args.batch,
              "unet_batch": 2 * args.batch, "iters": args.iters, "cuda_graphs": args.cuda_graphs,
              "build_config": spec, "shared_device_memory_bytes": shared, "separate_device_memory_bytes": separate,
              "cuda_graph_fallback": fallback, "precisions": rows}
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {work / 'report.json'}")
    return 0 if all(r["vs_onnxruntime"]["comparator_passed"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
