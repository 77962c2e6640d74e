"""What quantizing w8a8's float layers would cost: the skip and downsample convs (``PTQD_KEEP_FP``, float in w8a8)
quantized at their inputs and weights with float outputs (no requantization into the residual stream), against
today's w8a8, both calibrated afresh on a copy of BUNDLE.

    python benchmarks/skip_convs_int8.py BUNDLE [--num 500] [--work DIR]

Prints paired PSNR and FD vs FP of each w8a8 (correction off, ONNX Runtime). The engine of the variant runs those
convs in float on dequantized values (ONNX Runtime has no integer conv with a float output), so this measures
quality only: whether the speed of int8 skip convs could be had at w8a8's 40 dB.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path


def quantize_float_layers(calibrate_module) -> None:
    """Patch calibration: the PTQD_KEEP_FP layers are quantized in w8a8 too, with float outputs."""
    C = calibrate_module
    select, quantize = C.select_layers, C.quantize_layers

    def select_all(rows, keep_fp=C.DEFAULT_KEEP_FP):
        out = select(rows, keep_fp)
        for r in out:
            if r.pop("float_in", None) is not None or any(re.search(p, r["module"]) for p in C.PTQD_KEEP_FP):
                r["float_out"] = True
        return out

    def quantize_float_out(loaded, selected, obs, cfg, precision, weights, steps=None, range_cache=None):
        layers = quantize(loaded, selected, obs, cfg, precision, weights, steps, range_cache)
        names = {r["name"] for r in selected if r.get("float_out")}
        for lq in layers:
            if lq.name in names and precision == "w8a8":
                lq.act_out = None
        return layers

    C.select_layers, C.quantize_layers = select_all, quantize_float_out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--work", help="where the two copies go (default: a temporary folder)")
    args = ap.parse_args(argv)
    import multiprocessing as mp

    work = Path(args.work or tempfile.mkdtemp(prefix="skip-int8-"))
    rows = {}
    for variant in ("today", "skip convs int8"):
        dst = work / ("today" if variant == "today" else "skip-int8") / "b.bundle"
        shutil.rmtree(dst.parent, ignore_errors=True)
        dst.parent.mkdir(parents=True)
        shutil.copytree(args.bundle, dst)
        with mp.get_context("spawn").Pool(1) as pool:  # a fresh process: the patch stays in it
            rows[variant] = pool.apply(run, (str(dst), variant != "today", args.num))
    from ptqd.resources import cpu_description

    print(f"{args.bundle}, w8a8, {args.num} samples, correction off, ONNX Runtime; {cpu_description()}")
    for variant, (psnr, fd) in rows.items():
        print(f"  {variant:16s} paired PSNR vs FP {psnr:6.2f} dB   FD vs FP {fd:.3f}")
    return 0


def run(bundle: str, patch: bool, num: int) -> tuple[float, float]:
    from ptqd import api
    from ptqd.calib import calibrate as C

    if patch:
        quantize_float_layers(C)
    api.calibrate(bundle, progress=False)
    api.build(bundle, precisions=("w8a8",), progress=False)
    rep = api.evaluate(bundle, precisions=("fp32", "w8a8"), num=num, correction="off", progress=False,
                       write_report=False)
    row = next(r for r in rep["rows"] if r["precision"].startswith("w8a8"))
    return float(row["psnr_vs_fp"]), float(row["fd_vs_fp"])


if __name__ == "__main__":
    raise SystemExit(main())
