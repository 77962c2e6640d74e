"""Where an engine's time goes: ONNX Runtime's profiler, kernel time per op type, per forward.

    python benchmarks/profile_ops.py BUNDLE [--precisions fp32,w8a8,ort-int8] [--batch 1] [--runs 5] [--threads 2]

Each engine runs ``--runs`` profiled forwards after 2 warm-up runs (one session at a time, spinning
on); the table gives ms per forward for each op type (sum of its kernels' durations), the share of
the engine's kernel time and the node count, largest first.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile


def profile(path, feeds, runs: int, threads: int) -> tuple[dict, dict]:
    import onnxruntime as ort

    from ptqd.engines.packed import is_packed, load_session_bytes

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="ptqd-prof-"), "p")
    src = load_session_bytes(path) if is_packed(path) else str(path)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    f = {k: v for k, v in feeds.items() if k in names}
    for _ in range(2):
        sess.run(None, f)
    prof = sess.end_profiling()  # warm-up runs go into their own file
    so.profile_file_prefix = prof + ".runs"
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, f)
    events = json.load(open(sess.end_profiling()))
    by_op: dict = collections.defaultdict(float)
    count: dict = collections.Counter()
    seen_run = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            seen_run += 1
    runs_seen = max(seen_run, 1)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        by_op[op] += e["dur"] / 1e3 / runs_seen
        count[op] += 1
    return dict(by_op), {k: v // runs_seen for k, v in count.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precisions", default="fp32,w8a8,ort-int8")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from ptqd.api import BUILD_JSON, UNET_ONNX
    from ptqd.bundle import Bundle
    from ptqd.facts import seeded_unet_inputs

    b = Bundle.open(args.bundle)
    built = b.read_json(BUILD_JSON) if b.has(BUILD_JSON) else {}
    feeds = seeded_unet_inputs(b.facts, args.batch, 501.0, 0)
    out = {}
    for p in args.precisions.split(","):
        path = b.path(UNET_ONNX) if p == "fp32" else b.path(built[p]["buckets"][0]["engine"])
        by_op, count = profile(path, feeds, args.runs, args.threads)
        total = sum(by_op.values())
        out[p] = {"kernel_ms": total, "ops": by_op, "nodes": count}
        print(f"\n{p}: {total:.1f} ms kernel time per forward (batch {args.batch}, {args.threads} threads)")
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:18]:
            print(f"  {op:<28}{ms:9.2f} ms {100 * ms / total:5.1f} %  x{count[op]}")
    return out


if __name__ == "__main__":
    main()
