"""What ``--outliers`` costs at real size: the rewritten model's engines (a Mul per smoothed layer, an 8-bit
low-rank branch beside each layer) against the plain model's, on ONNX Runtime and OpenVINO.

    python benchmarks/outliers_speed.py --size mid [--work DIR] [--outliers svd] [--rank-budget 0.05]
                                        [--outlier-layers 1,0.25] [--runs 10]

Builds (or reuses, in ``DIR``) the seeded random-weight cin256-v2-family checkpoint and two bundles from it: the
plain export (``speed_at_size.py``'s ``DIR/<size>.bundle``) and ``DIR/<size>.<outliers>[-<share>].bundle`` exported
with ``--outliers``, one for each ``--outlier-layers`` share; all get a fast calibration (nearest rounding, 1 trajectory, 4 steps: speed does not depend on
weight values; random weights have no outlier channels, so this says nothing about quality) and w4a8 + w4a4
engines on both backends. Then in one process, interleaved rounds, ``--threads`` threads, median of ``--runs``
after warm-up, batch 1 and 2: every engine, and each one's file size against the plain FP32 ONNX's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from speed_at_size import _machine, onnx_bytes, prepare  # noqa: E402

PRECISIONS = ("w4a8", "w4a4")


def rewritten(work: Path, size: str, mode: str, budget: float, share: float = 1.0, log=print) -> Path:
    from ptqd import api
    from ptqd.bundle import Bundle

    out = work / (f"{size}.{mode}.bundle" if share == 1.0 else f"{size}.{mode}-{share:g}.bundle")
    ckpt = work / f"cin256_{size}.safetensors"
    b = Bundle.open(out) if (out / "manifest.json").exists() else None
    rec = (b.stage("export") or {}).get("outliers") if b else None
    if not rec or rec["mode"] != mode or rec["rank_budget"] != budget or rec.get("layer_share", 1.0) != share:
        t0 = time.perf_counter()
        api.export(str(ckpt), out, first_stage=False, progress=False, outliers=mode, rank_budget=budget,
                   outlier_layers=share)
        log(f"export --outliers {mode} --outlier-layers {share:g}: {time.perf_counter() - t0:.0f} s")
        b = Bundle.open(out)
    if b.stage("calibrate") is None:
        api.calibrate(out, samples=1, steps=4, rounding="nearest", progress=False)
    if b.stage("build") is None or Bundle.open(out).stage("build") is None:
        api.build(out, precisions=PRECISIONS, validate=False, progress=False)
    if Bundle.open(out).stage("build_openvino") is None:
        api.build(out, backend="openvino", precisions=PRECISIONS, validate=False, progress=False)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("small", "mid", "full"), default="mid")
    ap.add_argument("--work", default="speed-bench")
    ap.add_argument("--outliers", choices=("smooth", "lowrank", "svd"), default="svd")
    ap.add_argument("--rank-budget", type=float, default=0.05)
    ap.add_argument("--outlier-layers", default="1",
                    help="comma-separated shares of the 4-bit layers rewritten, one bundle each (default 1: all)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.engines.runner import round_robin
    from ptqd.facts import seeded_unet_inputs

    work = Path(args.work)
    plain = prepare(work, args.size, 1, 4, "nearest", False)
    shares = [float(x) for x in args.outlier_layers.split(",")]
    rws = {(args.outliers if s == 1.0 else f"{args.outliers}-{s:g}"): rewritten(work, args.size, args.outliers,
                                                                                   args.rank_budget, s)
           for s in shares}
    fp_bytes = sum(p.stat().st_size for p in plain.glob("unet.onnx*"))
    runners, sizes = {}, {}
    for tag, path in (("plain", plain), *rws.items()):
        b = Bundle.open(path)
        built, ov = b.read_json(api.BUILD_JSON), b.read_json("engines/openvino/build.json")
        for p in PRECISIONS:
            runners[f"{p} {tag} ort"] = api.open_engine(b, p, args.threads, allow_spinning=False)
            sizes[f"{p} {tag} ort"] = onnx_bytes(Path(b.root, built[p]["buckets"][0]["engine"]))
            runners[f"{p} {tag} openvino"] = api.open_engine(b, p, args.threads, backend="openvino")
            sizes[f"{p} {tag} openvino"] = ov[p]["size_bytes"]
    facts = Bundle.open(plain).facts
    print()
    for tag, path in rws.items():
        rec = Bundle.open(path).stage("export")["outliers"]
        print(f"{args.size} {tag}: {rec['layers']} layers rewritten ({rec['smoothed']} smoothed, branch ranks "
              f"{rec['branch_ranks']} in all, budget {args.rank_budget})")
    print(f"{args.threads} threads, interleaved, median of {args.runs} ({_machine()})")
    out = {}
    for batch in (1, 2):
        f = seeded_unet_inputs(facts, batch, 501.0, 0)
        call = (f["x"], f["t"], f.get("context"))
        for r in runners.values():
            r(*call)
        times = round_robin({k: (lambda r=r: r(*call)) for k, r in runners.items()}, args.runs, args.warmup)
        out[batch] = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    print(f"{'engine':<28}{'batch 1 ms':>12}{'batch 2 ms':>12}{'x w4a8 plain':>14}{'MB':>8}{'FP32 / size':>13}")
    for k in runners:
        backend = k.rsplit(" ", 1)[1]
        ref = [out[bt][f"w4a8 plain {backend}"] / out[bt][k] for bt in (1, 2)]
        print(f"{k:<28}{out[1][k]:12.1f}{out[2][k]:12.1f}{'/'.join(f'{1 / x:.2f}' for x in ref):>14}"
              f"{sizes[k] / 1e6:8.1f}{fp_bytes / sizes[k]:13.2f}")
    return out


if __name__ == "__main__":
    main()
