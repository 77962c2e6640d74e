"""`ptqd compile` at real sizes: the cin256-v2 (LDM-4 ImageNet) family with seeded random weights.

    python benchmarks/scale.py --size mid  [--work DIR] [--preset auto] [--device auto]   # 47.0 M parameters
    python benchmarks/scale.py --size full [--work DIR] [--preset minimal]                 # 400.9 M, cin256-v2

Writes the checkpoint (safetensors + YAML; ε scaled to unit std, see ``ptqd.models.tiny``) into
``DIR``, runs ``ptqd compile`` with the given preset, and prints each stage's wall time and peak
resident memory (the compile stage record in the manifest), plus the calibration's own breakdown
and every engine's validation verdict. The JSON summary goes to ``DIR/scale_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ptqd.precision import ORT_BUILDABLE


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("small", "mid", "full"), default="mid")
    ap.add_argument("--work", default="scale-bench", help="working directory (checkpoint, bundle, summary)")
    ap.add_argument("--preset", default="auto", help="compute preset (ptqd compile --preset)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--force", action="store_true", help="recompile every stage")
    ap.add_argument("--precisions", default=",".join(map(str, ORT_BUILDABLE)),
                    help="engines (default: ptqd compile's, %(default)s)")
    args = ap.parse_args(argv)

    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.models.tiny import write_cin256_family
    from ptqd.resources import TreePeak, cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"cin256_{args.size}.safetensors"
    if not ckpt.exists():
        t0 = time.perf_counter()
        write_cin256_family(ckpt, args.size)
        print(f"wrote {ckpt} ({ckpt.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    out = work / f"cin256_{args.size}.bundle"
    t0 = time.perf_counter()
    with TreePeak() as watch:  # the whole process tree over the whole compile
        res = api.compile(str(ckpt), out, precisions=tuple(args.precisions.split(",")), preset=args.preset,
                          device=args.device, force=args.force)
    total = time.perf_counter() - t0
    b = Bundle.open(out)
    info = api.inspect(out)
    cal = b.stage("calibrate")
    build = b.read_json("engines/onnxruntime/build.json")
    summary = {"size": args.size, "parameters": info["weight_params"], "macs_per_forward": info["macs_per_forward"],
               "preset": res["preset"], "stages": res["costs"], "total_seconds": round(total, 1),
               "peak_rss_gib_whole_compile": round(watch.peak_bytes / 2**30, 2), "cpu": cpu_description(),
               "calibrate_breakdown": cal.get("seconds"), "calibrate_device": cal.get("device"),
               "validation": {p: {k: r["validation_vs_fake_quant"].get(k) for k in
                                  ("passed", "verdict", "median_rel_l2", "worst_rel_l2", "cascade")}
                              for p, r in build.items() if "validation_vs_fake_quant" in r},
               "plan": res["plan"]}
    print(f"\ncin256-v2 family, {args.size}: {info['weight_params'] / 1e6:.1f} M parameters, "
          f"{info['macs_per_forward'] / 1e9:.2f} GMAC per forward, preset {res['preset']}")
    print(f"{'stage':<10}{'seconds':>9}{'peak GiB':>13}")
    for name, c in res["costs"].items():
        if c.get("reused"):
            print(f"{name:<10}{'reused':>9}")
        else:
            peak = c.get("peak_rss_mb")
            print(f"{name:<10}{c['seconds']:9.0f}{(peak or 0) / 1024:13.2f}")
    print(f"{'total':<10}{total:9.0f}{watch.peak_bytes / 2**30:13.2f}  (whole process tree, polled every 50 ms)")
    print(f"cpu: {summary['cpu']}")
    print(f"calibrate: {cal.get('seconds')} on {cal.get('device')}")
    for p, v in summary["validation"].items():
        print(f"{p}: validation {'passed' if v['passed'] else 'FAILED'} ({v.get('verdict')}); engine vs fake-quant "
              f"median {v['median_rel_l2']:.2e}")
    (work / f"scale_{args.size}.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
