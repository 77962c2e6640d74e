"""Wall time of a job in one process and spread over Ray workers on this machine, with the whole process tree's
peak memory (the Ray workers are descendants of the command, so they are counted).

    python benchmarks/cluster_speed.py eval BUNDLE --num 2000 --precisions fp32,w8a8 --json out.json
    python benchmarks/cluster_speed.py correct BUNDLE --json out.json      # on a copy of BUNDLE per run

Each job runs as ``ptqd eval`` / ``ptqd correct`` three ways: one process (torch/ORT on every core), one Ray
worker with every core, and one Ray worker per core with one thread each. Ray's start-up is part of the time,
as a user pays it. For eval the rows must match the single-process run's (FD, PSNR, accuracy; the report
differs only in seconds); for correct, the fit is compared too (it is identical where the worker's torch thread
count equals the single process's; torch's CPU kernels may sum in another order with another count).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> dict:
    from ptqd.resources import TreePeak

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    with TreePeak(proc.pid) as watch:
        out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit {proc.returncode}")
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_gb": round(watch.peak_bytes / 2**30, 2),
            "stdout": out}


def ways(cpus: int) -> list[tuple[str, list[str]]]:
    return [("one process", []),
            (f"Ray, 1 worker x {cpus} threads", ["--ray", "local", "--workers", "1", "--threads", str(cpus)]),
            (f"Ray, {cpus} workers x 1 thread", ["--ray", "local", "--workers", str(cpus), "--threads", "1"])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("job", choices=("eval", "correct"))
    ap.add_argument("bundle")
    ap.add_argument("--num", type=int, default=2000, help="eval: samples (default 2000)")
    ap.add_argument("--precisions", default="fp32,w8a8", help="eval: rows (default fp32,w8a8)")
    ap.add_argument("--shard-size", type=int, help="samples per shard (default: the job's batch)")
    ap.add_argument("--args", default="", help="more options for the ptqd command, e.g. \"--samples 16 --batch 4\"")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    from ptqd.resources import cpu_description

    cpus = os.cpu_count() or 1
    ptqd = str(Path(sys.executable).with_name("ptqd"))
    rows, reference = [], None
    shard = ["--shard-size", str(args.shard_size)] if args.shard_size else []
    print(f"CPU: {cpu_description()}", file=sys.stderr)
    for name, extra in ways(cpus):
        with tempfile.TemporaryDirectory(dir=Path(args.bundle).resolve().parent) as tmp:
            if args.job == "eval":
                cmd = [ptqd, "eval", args.bundle, "--num", str(args.num), "--precisions", args.precisions, "--json"]
                target = None
            else:  # correct writes into the bundle: each way works on its own copy
                target = Path(tmp) / "b.bundle"
                shutil.copytree(args.bundle, target)
                cmd = [ptqd, "correct", str(target)]
            r = run(cmd + args.args.split() + (extra + shard if extra else []))
            if args.job == "eval":
                result = [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads(r["stdout"])["rows"]]
            else:
                rec = json.loads((target / "calib" / "correction.json").read_text())
                result, r["collect_seconds"] = rec["precisions"], rec.get("collect_seconds")
        same = None if reference is None else result == reference
        reference = result if reference is None else reference
        rows.append({"way": name, "seconds": r["seconds"], "peak_rss_gb": r["peak_rss_gb"], "same_result": same,
                     "trajectory_seconds": r.get("collect_seconds")})
        print(f"{name:32s} {r['seconds']:8.1f} s  peak {r['peak_rss_gb']:.2f} GiB  same as one process: {same}",
              file=sys.stderr)
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup_vs_one_process"] = round(base / row["seconds"], 2)
    out = {"job": args.job, "bundle": args.bundle, "args": args.args, "cpu": cpu_description(), "num": args.num if args.job == "eval"
           else None, "precisions": args.precisions if args.job == "eval" else None, "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
