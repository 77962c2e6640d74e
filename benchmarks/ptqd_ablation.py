"""PTQD ablation over several seeds: does the correction help, and does the plan hold up?

    python benchmarks/ptqd_ablation.py BUNDLE [--seeds 0,1,2,3] [--num 500] [--json OUT.json]

For each seed and eta in {0, 1}: FP32 and, for w4a8, w4a4 and the plan, the uncorrected engine,
+ correlated correction (k), + bias, and at eta 1 + VSC (and VSC with the reference code's
direction term, sigma_t', with --sigma-prime). Prints FD to real images, FD to FP's samples, paired
PSNR vs FP and class accuracy, mean and std over seeds, and the mean per-seed difference corrected -
uncorrected (paired: same seed, same noise).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ptqd import api

ROWS0 = [(p, c) for p in ("w4a8", "w4a4", "auto") for c in ("off", ("k",), ("k", "bias"))]
ROWS1 = [(p, c) for p in ("w4a8", "w4a4", "auto") for c in ("off", ("k", "bias"), ("k", "bias", "vsc"))]
ROWS1_PRIME = [(p, ("k", "bias", "vsc")) for p in ("w4a8", "w4a4", "auto")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--json")
    ap.add_argument("--sigma-prime", action="store_true", help="also VSC with the reference's direction term")
    ap.add_argument("--plans", default="", help="comma-separated plan files to compare (rows +ptqd and off)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = [p for p in args.plans.split(",") if p]
    rows0 = ROWS0 + [(p, c) for p in extra for c in ("off", ("k", "bias"))]
    rows1 = ROWS1 + [(p, c) for p in extra for c in ("off", ("k", "bias"), ("k", "bias", "vsc"))]
    runs = {"eta0": (0.0, rows0, "sigma"), "eta1": (1.0, rows1, "sigma")}
    if args.sigma_prime:
        runs["eta1_sigma_prime"] = (1.0, ROWS1_PRIME, "sigma_prime")
    results: dict = {k: {} for k in runs}
    for seed in seeds:
        for name, (eta, rows, direction) in runs.items():
            rep = api.evaluate(args.bundle, rows=rows, num=args.num, seed=seed, eta=eta, progress=False,
                               write_report=False, vsc_direction=direction, eps_mse=False)
            for r in rep["rows"]:
                results[name].setdefault(r["precision"], []).append(
                    {"seed": seed, "fd": r["fd"], "fd_fp": r.get("fd_vs_fp"), "psnr": r.get("psnr_vs_fp"), "acc": r["class_acc"],
                     "eps_mse": r.get("eps_mse_mean")})
            print(f"seed {seed} {name} done", flush=True)
    for name, table in results.items():
        print(f"\n{name} ({len(seeds)} seeds x {args.num} samples): mean ± std over seeds")
        print(f"{'row':<20}{'FD':>15}{'FD vs FP':>15}{'PSNR vs FP':>15}{'acc':>7}{'dFD':>7}{'dFDvsFP':>8}{'dPSNR':>8}")

        def col(vals, key):
            return np.array([np.nan if v[key] is None else v[key] for v in vals], dtype=float)

        for row, vals in table.items():
            fd, fdfp, ps, acc = col(vals, "fd"), col(vals, "fd_fp"), col(vals, "psnr"), col(vals, "acc")
            base = table.get(row.split("+")[0])
            deltas = ["", "", ""]
            if base is not None and "+" in row:
                deltas = [f"{np.nanmean(a - col(base, k)):+.2f}" for a, k in ((fd, "fd"), (fdfp, "fd_fp"),
                                                                              (ps, "psnr"))]

            def ms(a):
                return "-".rjust(15) if np.isnan(a).all() else f"{np.nanmean(a):8.2f} ± {np.nanstd(a):4.2f}"

            print(f"{row:<20}{ms(fd)}{ms(fdfp)}{ms(ps)}{100 * np.nanmean(acc):6.1f}%{deltas[0]:>7}{deltas[1]:>8}"
                  f"{deltas[2]:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
