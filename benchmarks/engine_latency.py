"""UNet forward latency per engine, as ratios to ONNX Runtime FP32, measured in one process.

    python benchmarks/engine_latency.py BUNDLE [--precisions ort-int8,w8a8,w4a8,w4a4] [--runs 30] [--threads 2]

Engines are timed round-robin (each round runs every engine once, so drift on a noisy machine
hits all of them alike), after warm-up; reports median and min per engine and the median ratio
FP32 / engine (> 1: faster than FP32). Batch 1 and the CFG-doubled batch 2.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.facts import seeded_unet_inputs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="ort-int8,w8a8,w4a8,w4a4")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    b = Bundle.open(args.bundle)
    names = ["fp32"] + [p for p in args.precisions.split(",") if p]
    # several sessions take turns: ORT's spinning worker threads would otherwise steal the cores of the
    # session that runs (MEASURED.md); spinning is off for every engine alike
    runners = {p: api.open_engine(b, p, threads=args.threads, allow_spinning=False) for p in names}
    out = {"threads": args.threads, "runs": args.runs, "batches": {}}
    for batch in (int(x) for x in args.batches.split(",")):
        feeds = seeded_unet_inputs(b.facts, batch, 501.0, 0)
        args_ = (feeds["x"], feeds["t"], feeds.get("context"))
        times = {p: [] for p in names}
        for i in range(args.warmup + args.runs):
            for p in names:
                t0 = time.perf_counter()
                runners[p](*args_)
                if i >= args.warmup:
                    times[p].append(time.perf_counter() - t0)
        med = {p: float(np.median(v)) for p, v in times.items()}
        out["batches"][batch] = {p: {"median_ms": 1e3 * med[p], "min_ms": 1e3 * float(np.min(times[p])),
                                     "speedup_vs_fp32": med["fp32"] / med[p]} for p in names}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for batch, rows in out["batches"].items():
            print(f"batch {batch} ({args.threads} threads, median of {args.runs} after {args.warmup} warm-up)")
            for p, r in rows.items():
                print(f"  {p:<10}{r['median_ms']:9.3f} ms  (min {r['min_ms']:.3f})  x{r['speedup_vs_fp32']:.2f} vs fp32")
    return out


if __name__ == "__main__":
    main()
