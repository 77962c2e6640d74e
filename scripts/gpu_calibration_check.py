"""Calibration on a CUDA GPU vs the CPU, for a user (or a CI machine) that has one.

    python scripts/gpu_calibration_check.py [--size small|mid|full] [--work DIR] [--preset auto]

Builds a cin256-v2-family checkpoint with seeded random weights (``benchmarks/scale.py``'s), exports
it once, calibrates two copies of the bundle, one with ``--device cpu`` and one with ``--device
cuda``, then builds and validates the ONNX Runtime engines of the CUDA calibration (on the CPU, against
the fake-quant model). Prints and writes ``DIR/gpu_check.json``:

  seconds           calibrate on each device (observe, H + weights, ranges + write)
  weights equal     share of integer weights identical between the two calibrations, per precision
                    (float32 reductions in another order move a few rounding ties)
  scale rel diff    largest relative difference of any activation scale
  engines           the CUDA calibration's engines: validation verdict per precision

Exits 1 when torch sees no GPU (nothing to compare) or when an engine fails validation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("small", "mid", "full"), default="mid")
    ap.add_argument("--work", default="gpu-check")
    ap.add_argument("--preset", default="auto")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.models.tiny import write_cin256_family

    if not torch.cuda.is_available():
        print("torch sees no CUDA GPU: nothing to compare (run this where `torch.cuda.is_available()` is True)")
        return 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"cin256_{args.size}.safetensors"
    if not ckpt.exists():
        write_cin256_family(ckpt, args.size)
    base = work / "exported.bundle"
    if not base.exists():
        api.export(str(ckpt), base, progress=False)
    out: dict = {"gpu": torch.cuda.get_device_name(0), "size": args.size, "seconds": {}}
    bundles = {}
    for dev in ("cpu", "cuda"):
        dst = work / f"{dev}.bundle"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(base, dst)
        t0 = time.perf_counter()
        rec = api.calibrate(dst, device=dev, preset=args.preset, progress=False)
        out["seconds"][dev] = {"wall": round(time.perf_counter() - t0, 1), **rec["seconds"]}
        bundles[dev] = Bundle.open(dst)
    cpu, gpu = bundles["cpu"], bundles["cuda"]
    out["weights_equal"], out["scale_rel_diff"] = {}, {}
    for p in ("w8a8", "w4a8", "w4a4"):
        a, g = np.load(cpu.path(f"calib/{p}.npz")), np.load(gpu.path(f"calib/{p}.npz"))
        ints = [k for k in a.files if k.endswith(".w_int")]
        same = sum(int((a[k] == g[k]).sum()) for k in ints)
        out["weights_equal"][p] = same / sum(a[k].size for k in ints)
        ma, mg = cpu.read_json(f"calib/{p}.json")["layers"], gpu.read_json(f"calib/{p}.json")["layers"]
        out["scale_rel_diff"][p] = max(abs(x["act_in"]["scale"] / y["act_in"]["scale"] - 1) for x, y in zip(ma, mg))
    built = api.build(gpu.root, precisions=("w8a8", "w4a8", "w4a4"), progress=False)
    out["engines"] = {p: r["validation_vs_fake_quant"].get("verdict") for p, r in built.items()}
    print(f"GPU {out['gpu']}; cin256-v2 family {args.size}")
    for dev, s in out["seconds"].items():
        print(f"  calibrate on {dev:<5} {s['wall']:7.1f} s  (observe {s['observe']}, H + weights {s['weights']}, "
              f"ranges + write {s['ranges_and_write']})")
    for p in out["weights_equal"]:
        print(f"  {p}: integer weights equal {100 * out['weights_equal'][p]:.2f}%, activation scales within "
              f"{out['scale_rel_diff'][p]:.1e}; engine of the CUDA calibration: {out['engines'][p]}")
    (work / "gpu_check.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
