"""The full-size SDXL base UNet (2.57 B parameters, random weights) through `ptqd export`: time and peak memory of
the whole process tree, and the layer table's MACs per forward at 1024x1024 beside an independent count (forward
hooks on diffusers' own model on the meta device, `ptqd.models.macs`).

    python benchmarks/sdxl_full.py [--work DIR] [--validate]

Writes DIR/sdxl-base (the pipeline: the real UNet architecture, small text encoders and VAE of the widths it
needs; 10.3 GB) once, then DIR/sdxl-base.bundle (`ptqd export --no-first-stage`, with `--no-validate` unless
--validate: ONNX Runtime vs torch at 1024x1024, two timesteps of batch 1, torch's outputs first and its weights
freed before ONNX Runtime loads its copy), and DIR/sdxl_full.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="sdxl-bench")
    ap.add_argument("--validate", action="store_true", help="check ONNX Runtime against torch at 1024x1024 (a few minutes more)")
    args = ap.parse_args(argv)
    import torch

    from ptqd.models.macs import count_macs
    from ptqd.models.tiny_sd import sdxl_base_unet
    from ptqd.resources import TreePeak, cpu_description

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, bundle = work / "sdxl-base", work / "sdxl-base.bundle"
    res: dict = {"machine": cpu_description()}
    if not (src / "model_index.json").exists():
        t0 = time.perf_counter()
        with TreePeak() as peak:  # in a child: its 10 GB go back to the system before the export starts
            code = f"from ptqd.models.tiny_sd import write_sdxl_base_pipeline as w; w({str(src)!r})"
            if subprocess.run([sys.executable, "-c", code]).returncode:
                return 1
        res["write_pipeline"] = {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": peak.peak_mb}
        print(f"pipeline written: {res['write_pipeline']}", flush=True)
    cmd = [sys.executable, "-m", "ptqd.cli", "export", str(src), "--out", str(bundle), "--no-first-stage"]
    if not args.validate:
        cmd.append("--no-validate")
    t0 = time.perf_counter()
    with TreePeak() as peak:
        r = subprocess.run(cmd)
    res["export"] = {"command": " ".join(cmd[1:]), "exit": r.returncode, "seconds": round(time.perf_counter() - t0, 1),
                     "peak_rss_mb": peak.peak_mb}
    print(f"export: {res['export']}", flush=True)
    if r.returncode:
        return r.returncode
    table = json.loads((bundle / "unet.layers.json").read_text())
    unet = sdxl_base_unet(device="meta")
    with torch.device("meta"):
        x, t, c = torch.randn(1, 4, 128, 128), torch.tensor([500.0]), torch.randn(1, 77, 2048)
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    hooks = count_macs(unet, x, t, encoder_hidden_states=c, added_cond_kwargs=added)
    res["parameters"] = sum(p.numel() for p in unet.parameters())
    res["macs"] = {"layer_table": table["macs_by_kind"], "forward_hooks": hooks,
                   "layer_table_total": table["macs_per_forward"], "forward_hooks_total": sum(hooks.values())}
    files = {p.name: p.stat().st_size for p in bundle.iterdir() if p.is_file()}
    res["files"] = files
    (work / "sdxl_full.json").write_text(json.dumps(res, indent=1))
    print(f"\nSDXL base UNet, {res['parameters'] / 1e9:.3f} B parameters, 1024x1024 (latent 128x128), batch 1; "
          f"{cpu_description()}")
    print(f"{'MACs':12s} {'layer table':>16s} {'forward hooks':>16s}")
    for k in ("conv", "linear", "attention"):
        print(f"{k:12s} {table['macs_by_kind'][k]:16,d} {hooks[k]:16,d}")
    print(f"{'total':12s} {table['macs_per_forward']:16,d} {sum(hooks.values()):16,d}")
    print(f"export: {res['export']['seconds']:.0f} s, peak RSS {res['export']['peak_rss_mb'] / 1024:.2f} GiB (whole tree); "
          f"unet.onnx.data {files.get('unet.onnx.data', 0) / 1e9:.2f} GB")
    if args.validate:
        rep = json.loads((bundle / "reports/export_validation.json").read_text())["unet"]
        res["validation"] = rep
        (work / "sdxl_full.json").write_text(json.dumps(res, indent=1))
        print("validation, ONNX Runtime vs torch at 1024x1024: "
              + ", ".join(f"t={r['t']:g} max |diff| {r['max_abs_error']:.2e} (bound {r['bound']:.2e})"
                          for r in rep["per_timestep"]) + f"; passed: {rep['passed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
