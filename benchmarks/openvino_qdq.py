"""OpenVINO running ptqd's own QDQ graphs (not a validated ptqd engine: OpenVINO's low-precision
transformations decide what runs in int8, and its numerics are not checked against the fake-quant
model), beside ORT FP32, ptqd's ORT engine and OpenVINO FP32, one process, interleaved rounds.

    python benchmarks/openvino_qdq.py BUNDLE [--precisions w8a8,w4a8] [--runs 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="w8a8")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2")
    args = ap.parse_args(argv)
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.facts import seeded_unet_inputs
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.openvino import OvRunner

    b = Bundle.open(args.bundle)
    runners = {"ort-fp32": OrtRunner(b.path(api.UNET_ONNX), args.threads, allow_spinning=False),
               "ov-fp32": OvRunner(b.path(api.UNET_ONNX), args.threads)}
    for p in args.precisions.split(","):
        runners[p] = api.open_engine(b, p, args.threads, allow_spinning=False)
        runners[f"ov-{p}-qdq"] = OvRunner(b.path(f"engines/onnxruntime/{p}.qdq.onnx"), args.threads)
    for batch in (int(x) for x in args.batches.split(",")):
        f = seeded_unet_inputs(b.facts, batch, 501.0, 0)
        call = (f["x"], f["t"], f.get("context"))
        outs = {k: r(*call) for k, r in runners.items()}
        times = {k: [] for k in runners}
        for i in range(args.warmup + args.runs):
            for k, r in runners.items():
                t0 = time.perf_counter()
                r(*call)
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
        base = np.median(times["ort-fp32"])
        ref = outs["ort-fp32"]
        print(f"batch {batch} ({args.threads} threads, median of {args.runs} after {args.warmup} warm-up)")
        for k, v in times.items():
            rel = float(np.linalg.norm(outs[k] - ref) / np.linalg.norm(ref))
            print(f"  {k:<16}{1e3 * np.median(v):9.1f} ms  x{base / np.median(v):.2f} vs ORT FP32   "
                  f"rel-L2 vs ORT FP32 {rel:.3g}")


if __name__ == "__main__":
    main()
