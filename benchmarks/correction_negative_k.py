"""PTQD's correlated correction with the slope it actually fits: under the paper-like base quantizer the
fitted k_t is negative (the quantized ε is shrunk), and ptqd clamps it at 0. Does unclamping it, i.e.
dividing by 1 + k < 1 to unbias ε̂, help the final samples?

    python benchmarks/correction_negative_k.py [--floor -0.5] [--out DIR] [--seeds 2,3] [--num 500]

Compiles the demo with ``--recipe ptqd-paper`` (w4a8, w4a4) with the slope clamped at ``--floor``
instead of 0 (the end-to-end gate then also sees the negative k), prints each precision's k_raw range
and what the gate kept, then FD vs FP and paired PSNR vs FP per seed at η 0 (uncorrected, + k, + k + bias,
auto) and η 1 (uncorrected, + k + bias, + k + bias + VSC, + k + VSC, auto).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--floor", type=float, default=-0.5, help="lower clamp of the fitted slope (ptqd: 0)")
    ap.add_argument("--out", help="bundle directory (default: a temporary one)")
    ap.add_argument("--seeds", default="2,3")
    ap.add_argument("--num", type=int, default=500)
    args = ap.parse_args(argv)
    import ptqd.calib.correction as cc

    cc.K_FLOOR = args.floor
    from ptqd import api
    from ptqd.tools.evaluate import evaluate

    out = Path(args.out or tempfile.mkdtemp(prefix="ptqd-negk-")) / "paper.bundle"
    t0 = time.perf_counter()
    api.compile("demo", out, precisions=("w4a8", "w4a4"), recipe="ptqd-paper", progress=False, log=lambda *a: None)
    print(f"compile (ptqd-paper recipe, k clamped at {args.floor:g}): {time.perf_counter() - t0:.0f} s")
    rec = json.loads((out / "calib" / "correction.json").read_text())
    for p, s in rec["summary"].items():
        lo, hi = s["k_raw_range"]
        print(f"{p}: k_raw [{lo:+.3f}, {hi:+.3f}]; the gate kept: {s['applied']}")
    rows = {0.0: [(p, c) for p in ("w4a8", "w4a4") for c in ("off", ("k",), ("k", "bias"), "auto")],
            1.0: [(p, c) for p in ("w4a8", "w4a4") for c in ("off", ("k", "bias"), ("k", "bias", "vsc"),
                                                              ("k", "vsc"), "auto")]}
    for eta, rs in rows.items():
        for seed in (int(s) for s in args.seeds.split(",")):
            r = evaluate(out, num=args.num, seed=seed, eta=eta, rows=rs, progress=False, write_report=False,
                         eps_mse=False)
            for row in r["rows"][1:]:
                print(f"eta {eta:g} seed {seed} {row['precision']:<20} FD vs FP {row['fd_vs_fp']:8.2f}   "
                      f"PSNR vs FP {row['psnr_vs_fp']:6.2f}")


if __name__ == "__main__":
    main()
