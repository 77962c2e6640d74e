"""The correction the runtime applies vs uncorrected (and the raw PTQD fit, and the conditional one).

    python benchmarks/correction_gate.py BUNDLE [--seeds 2,3,4] [--num 500] [--precisions w8a8,w4a8,w4a4,auto]
                                        [--modes off,auto,on,conditional] [--etas 0,1] [--json OUT.json]

For each seed and eta: FP32 and, for each precision (``auto`` = the bundle's plan), one row per
correction mode: ``off`` (uncorrected), ``auto`` (what the end-to-end gate kept, the default),
``on`` (PTQD's raw fit: k, bias, VSC at eta > 0), ``conditional`` (E[Δ | ε_q] removed, + VSC).
Default seeds 2-4: calibration uses seed 0, the correction fit seed 1, the gate seed 101.
Prints FD vs FP and paired PSNR vs FP, mean ± std over seeds, and the mean per-seed difference to
the uncorrected row (paired: same seed, same noise) with the number of seeds where it is worse.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from ptqd import api

LABEL = {"off": "", "auto": "+ptqd", "on": "+ptqd-raw", "conditional": "+cond"}


def label(p: str, mode: str) -> str:
    return ("plan" if p == "auto" else p) + LABEL[mode]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--seeds", default="2,3,4")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--precisions", default="w8a8,w4a8,w4a4,auto")
    ap.add_argument("--modes", default="off,auto")
    ap.add_argument("--etas", default="0,1")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    precs = [p for p in args.precisions.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    if "off" not in modes:
        modes = ["off", *modes]
    rows = [(p, m) for p in precs for m in modes]
    results: dict = {}
    for eta in (float(e) for e in args.etas.split(",")):
        name = f"eta{eta:g}"
        results[name] = {}
        for seed in seeds:
            rep = api.evaluate(args.bundle, rows=rows, num=args.num, seed=seed, eta=eta, progress=False,
                               write_report=False, eps_mse=False)
            for r in rep["rows"]:
                results[name].setdefault(r["precision"], []).append(
                    {"seed": seed, "fd": r["fd"], "fd_fp": r.get("fd_vs_fp"), "psnr": r.get("psnr_vs_fp")})
            print(f"{name} seed {seed} done", flush=True)
    for name, table in results.items():
        print(f"\n{name} ({len(seeds)} seeds x {args.num} samples): mean ± std over seeds; d = row - uncorrected "
              "(mean over seeds), worse = seeds where the row is worse than uncorrected")
        print(f"{'row':<16}{'FD vs FP':>15}{'PSNR vs FP':>15}{'dFDvsFP':>9}{'dPSNR':>8}{'worse FD/PSNR':>15}")
        for p in precs:
            base = table.get(label(p, "off"))
            for m in modes:
                vals = table.get(label(p, m))
                if vals is None:
                    continue
                fd = np.array([v["fd_fp"] for v in vals], float)
                ps = np.array([v["psnr"] for v in vals], float)
                d = ""
                if m != "off":
                    bfd = np.array([v["fd_fp"] for v in base], float)
                    bps = np.array([v["psnr"] for v in base], float)
                    d = (f"{np.mean(fd - bfd):+9.3f}{np.mean(ps - bps):+8.3f}"
                         f"{int((fd > bfd + 1e-9).sum()):>8}/{int((ps < bps - 1e-9).sum())}")
                print(f"{label(p, m):<16}{np.mean(fd):8.3f} ± {np.std(fd):4.2f}{np.mean(ps):8.2f} ± {np.std(ps):4.2f}{d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
