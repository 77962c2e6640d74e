"""PTQD ablation over several seeds: does the correction help, and does the plan hold up?

    python benchmarks/ptqd_ablation.py BUNDLE [--seeds 0,1,2,3] [--num 500] [--json OUT.json]

For each seed and eta in {0, 1}: FP32 and, for w4a8, w4a4 and the plan, the uncorrected engine,
+ correlated correction (k), + bias, and at eta 1 + VSC (and VSC with the reference code's
direction term, sigma_t'). Prints FD, paired PSNR vs FP and class accuracy, mean and std over
seeds, and the per-seed difference corrected - uncorrected (paired: same seed, same noise).
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
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {"eta0": (0.0, ROWS0, "sigma"), "eta1": (1.0, ROWS1, "sigma"), "eta1_sigma_prime": (1.0, ROWS1_PRIME,
                                                                                                   "sigma_prime")}
    results: dict = {k: {} for k in runs}
    for seed in seeds:
        for name, (eta, rows, direction) in runs.items():
            rep = api.evaluate(args.bundle, rows=rows, num=args.num, seed=seed, eta=eta, progress=False,
                               write_report=False, vsc_direction=direction, eps_mse=False)
            for r in rep["rows"]:
                results[name].setdefault(r["precision"], []).append(
                    {"seed": seed, "fd": r["fd"], "psnr": r.get("psnr_vs_fp"), "acc": r["class_acc"],
                     "eps_mse": r.get("eps_mse_mean")})
            print(f"seed {seed} {name} done", flush=True)
    for name, table in results.items():
        print(f"\n{name} ({len(seeds)} seeds x {args.num} samples): mean ± std over seeds")
        print(f"{'row':<22}{'FD':>16}{'PSNR vs FP':>16}{'class acc':>12}{'dFD vs off':>14}{'dPSNR vs off':>14}")
        for row, vals in table.items():
            fd = np.array([v["fd"] for v in vals])
            ps = np.array([np.nan if v["psnr"] is None else v["psnr"] for v in vals])
            acc = np.array([v["acc"] for v in vals])
            base = table.get(row.split("+")[0])
            dfd = dps = ""
            if base is not None and "+" in row:
                dfd = f"{np.mean(fd - np.array([v['fd'] for v in base])):+.2f}"
                dps = f"{np.nanmean(ps - np.array([np.nan if v['psnr'] is None else v['psnr'] for v in base])):+.3f}"
            print(f"{row:<22}{fd.mean():9.2f} ± {fd.std():4.1f}{np.nanmean(ps):9.2f} ± {np.nanstd(ps):4.2f}"
                  f"{100 * acc.mean():11.1f}%{dfd:>14}{dps:>14}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
