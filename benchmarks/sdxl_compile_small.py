"""The full SDXL base UNet architecture (2.57 B parameters, random weights) compiled stage by stage at a small
latent: time and peak memory of the whole process tree per stage (polled every 50 ms, ``ptqd.resources.TreePeak``).

    python benchmarks/sdxl_compile_small.py [--work DIR] [--latent 32]
        [--stages export,calibrate,build,correct,plan,sample] [--export-args "--no-first-stage"]
        [--calibrate-args "--samples 2 --steps 4"] [--build-args "--precisions w8a8"] [--correct-args "--samples 2"]
        [--sample-args "--prompt P --precision auto"] [--memory-available 64G]

Writes DIR/sdxl-<latent> (the pipeline: the real UNet, small text encoders and VAE; 10.3 GB) once, then runs each
stage as its own ``ptqd`` command on DIR/sdxl-<latent>.bundle, stopping at the first that fails, and writes
DIR/sdxl_compile_<latent>.json. ``--memory-available`` sets ``PTQD_MEMORY_AVAILABLE`` for the stages, so that
ptqd's memory estimates (``ptqd.memory``), not yet fitted at this size, do not refuse a stage whose real peak
this run is there to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

STAGES = ("export", "calibrate", "build", "correct", "plan", "sample")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="sdxl-bench")
    ap.add_argument("--latent", type=int, default=32, help="latent size (default 32: 256x256 images)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--export-args", default="", help='e.g. "--no-first-stage" (then sample writes latents: '
                    'give it --out X.npz)')
    ap.add_argument("--calibrate-args", default="--samples 2 --steps 4")
    ap.add_argument("--build-args", default="--precisions w8a8")
    ap.add_argument("--correct-args", default="")
    ap.add_argument("--plan-args", default="")
    ap.add_argument("--sample-args", default='--prompt "a lighthouse on a cliff at dusk" --precision auto --num 1',
                    help="the sample stage's flags (its --out defaults to DIR/sdxl-<latent>.png)")
    ap.add_argument("--memory-available", default=None, help="PTQD_MEMORY_AVAILABLE for the stages, e.g. 64G")
    args = ap.parse_args(argv)
    from ptqd.resources import TreePeak, cpu_description

    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"--stages: unknown {bad}; choose from {', '.join(STAGES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, bundle = work / f"sdxl-{args.latent}", work / f"sdxl-{args.latent}.bundle"
    out_json = work / f"sdxl_compile_{args.latent}.json"
    res = json.loads(out_json.read_text()) if out_json.exists() else {}
    res.update(machine=cpu_description(), latent=args.latent)
    if not (src / "model_index.json").exists():
        t0 = time.perf_counter()
        code = (f"from ptqd.models.tiny_sd import write_sdxl_base_pipeline as w; "
                f"w({str(src)!r}, sample_size={args.latent})")
        with TreePeak() as peak:
            if subprocess.run([sys.executable, "-c", code]).returncode:
                return 1
        res["write_pipeline"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak.peak_mb}
        print(f"pipeline written: {res['write_pipeline']}", flush=True)
    env = dict(os.environ)
    if args.memory_available:
        env["PTQD_MEMORY_AVAILABLE"] = args.memory_available
    extra = {"export": args.export_args, "calibrate": args.calibrate_args, "build": args.build_args,
             "correct": args.correct_args, "plan": args.plan_args, "sample": args.sample_args}
    for stage in stages:
        cmd = [sys.executable, "-m", "ptqd.cli", stage]
        cmd += [str(src), "--out", str(bundle)] if stage == "export" else [str(bundle)]
        cmd += shlex.split(extra.get(stage, ""))
        if stage == "sample" and "--out" not in cmd:
            cmd += ["--out", str(work / f"sdxl-{args.latent}.png")]
        t0 = time.perf_counter()
        with TreePeak() as peak:
            r = subprocess.run(cmd, env=env)
        res[stage] = {"command": " ".join(["ptqd"] + cmd[3:]), "exit": r.returncode,
                      "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak.peak_mb}
        out_json.write_text(json.dumps(res, indent=1))
        print(f"{stage}: {res[stage]}", flush=True)
        if r.returncode:
            return r.returncode
    print(f"\nSDXL base UNet architecture at latent {args.latent}x{args.latent}; {res['machine']}")
    for stage in STAGES:
        if stage in res:
            s = res[stage]
            print(f"{stage:10s} {s['seconds']:8.1f} s  peak {s['peak_rss_mb'] / 1024:6.2f} GiB  exit {s['exit']}  "
                  f"({s['command']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
