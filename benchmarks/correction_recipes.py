"""Which base-quantizer recipe makes the quantization error correlated with ε (PTQD's k_t)?

    python benchmarks/correction_recipes.py [MODEL] [--work DIR] [--variants ...]

MODEL: what `ptqd export` takes (default: demo). For each variant (weights channel|tensor, activation
ranges mse|minmax|percentile, rounding nearest|gptq), a copy is calibrated and the correction fitted
(no engines, no gate: seconds on the demo); prints per precision the range of the raw slope k_raw
over the calibrated steps, the share of the error variance the linear fit explains on held-out
trajectories, and the held-out ε MSE before / after PTQD's fit / after the conditional fit.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ptqd import api
from ptqd.calib import calibrate as calib
from ptqd.stages.correct import correct

VARIANTS = {
    "default": {"method": "mse", "rounding": "gptq", "weights": "channel"},
    "ptqd-paper": {"method": "minmax", "rounding": "nearest", "weights": "tensor"},
    "tensor-percentile": {"method": "percentile", "rounding": "nearest", "weights": "tensor"},
    "tensor-mse": {"method": "mse", "rounding": "nearest", "weights": "tensor"},
    "channel-minmax": {"method": "minmax", "rounding": "nearest", "weights": "channel"},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="demo")
    ap.add_argument("--work", help="directory for the copies (default: a temporary one)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="ptqd-recipes-"))
    out = {}
    for name in args.variants.split(","):
        calib.RECIPES[f"bench-{name}"] = VARIANTS[name]
        dst = work / f"{name}.bundle"
        if dst.exists():
            shutil.rmtree(dst)
        api.export(args.model, dst, progress=False)
        api.calibrate(dst, recipe=f"bench-{name}", progress=False)
        rec = correct(dst, progress=False, gate=False)
        out[name] = rec["summary"]
        print(f"\n{name}: {VARIANTS[name]}")
        for p, s in rec["summary"].items():
            lo, hi = s["k_raw_range"]
            print(f"  {p}: k_raw [{lo:+.3f}, {hi:+.3f}]  explained {100 * s['explained_variance_holdout']:.1f}%  "
                  f"eps MSE {s['eps_mse_uncorrected_holdout']:.4f} -> ptqd {s['eps_mse_corrected_holdout']:.4f}, "
                  f"conditional {s['eps_mse_conditional_holdout']:.4f}")
    return out


if __name__ == "__main__":
    main()
