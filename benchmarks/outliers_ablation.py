"""End-to-end ablation of ``--outliers`` on the demo: today's engines against smoothing alone, the low-rank branch
alone and both, each a full ``ptqd compile demo`` (correction and plan included) and ``ptqd eval``.

    python benchmarks/outliers_ablation.py [--work DIR] [--modes none,smooth,lowrank,svd] [--rank-budgets 0.05]
        [--num 500] [--eta 0,1] [--seed 0] [--json FILE]

Per mode and rank budget (``none`` ignores the budget): the bundle ``DIR/<mode>-<budget>.bundle`` (reused when its
export settings match), then eval rows w8a8, w4a8, w4a4 and the step-aware plan with the bundle's default
correction, on ``--num`` samples from seed ``--seed`` (the calibration's and correction's trajectories use other
seeds), for each η. Columns: paired PSNR vs FP, FD vs FP, class accuracy (FP32's in the header), BOPs saving
(the branches counted at their 8 bits), the mean w4a4 layer error before/after the rewrite, and the branch's share
of the model's MACs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def bundle_for(work: Path, mode: str, budget: float) -> Path:
    from ptqd import api

    out = work / (f"{mode}-{budget:g}.bundle" if mode != "none" else "none.bundle")
    api.compile("demo", out, progress=False, log=lambda m: print(f"  {out.name}: {m}"), outliers=mode,
                rank_budget=budget)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="outliers-ablation")
    ap.add_argument("--modes", default="none,smooth,lowrank,svd")
    ap.add_argument("--rank-budgets", default="0.05")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--eta", default="0,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from ptqd import api
    from ptqd.resources import cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    budgets = [float(x) for x in args.rank_budgets.split(",")]
    runs = [("none", 0.05)] if "none" in args.modes.split(",") else []
    runs += [(m, bgt) for m in args.modes.split(",") if m != "none" for bgt in budgets]
    result = {"machine": cpu_description(), "num": args.num, "seed": args.seed, "rows": []}
    for mode, budget in runs:
        out = bundle_for(work, mode, budget)
        info = api.inspect(out)
        o = info.get("outliers") or {}
        for eta in (float(e) for e in args.eta.split(",")):
            rep = api.evaluate(out, precisions=("fp32", "w8a8", "w4a8", "w4a4", "auto"), num=args.num, seed=args.seed,
                               eta=eta, progress=False, write_report=False)
            for r in rep["rows"][1:]:
                result["rows"].append({"mode": mode, "rank_budget": budget if mode in ("lowrank", "svd") else None,
                                       "eta": eta, "precision": r["precision"], "psnr_vs_fp": r.get("psnr_vs_fp"),
                                       "fd_vs_fp": r.get("fd_vs_fp"), "class_acc": r.get("class_acc"),
                                       "fp_class_acc": rep["rows"][0].get("class_acc"),
                                       "bops_saving": r.get("bops_saving"),
                                       "layer_error": o.get("w4a4_layer_rel_error"),
                                       "branch_macs_share": o.get("branch_macs_share", 0.0)})
    print(f"\ndemo, {args.num} samples from seed {args.seed}, 20 DDIM steps, guidance 3 ({result['machine']})")
    print(f"{'outliers':<14}{'eta':>4}  {'precision':<14}{'PSNR vs FP':>11}{'FD vs FP':>10}{'class acc':>10}"
          f"{'BOPs saving':>12}{'w4a4 layer err':>18}{'branch MACs':>12}")
    for r in result["rows"]:
        name = r["mode"] + (f" {r['rank_budget']:g}" if r["rank_budget"] else "")
        le = r["layer_error"]
        err = f"{le['before']:.4f}->{le['after']:.4f}" if le else "-"
        print(f"{name:<14}{r['eta']:>4g}  {r['precision']:<14}{r['psnr_vs_fp']:>11.2f}{r['fd_vs_fp']:>10.2f}"
              f"{100 * r['class_acc']:>9.1f}%{r['bops_saving']:>11.1f}x{err:>18}{r['branch_macs_share']:>11.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
