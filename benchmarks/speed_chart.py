"""The speed chart of the README: x ONNX Runtime FP32 per engine and peer, at each batch size, one panel
per model size, from ``benchmarks/speed_at_size.py``'s JSON (``DIR/speed_<size>.json``).

    python benchmarks/speed_chart.py speed-bench/speed_mid.json [speed-bench/speed_full.json] --out docs/img/speed.png

The machine each JSON was measured on is printed under its panel: ratios are comparable within a panel
only (one process, interleaved rounds), never across machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDER = ("ort-fp32", "ov-fp32@f32", "ov-fp32", "ort-int8", "w8a8", "w4a8", "w4a4", "w8a8-openvino", "w4a8-openvino",
         "w4a4-openvino", "ov-nncf-int8", "ov-nncf-mixed", "ov-nncf-hybrid")
LABEL = {"ort-fp32": "ORT FP32", "ov-fp32": "OpenVINO FP32", "ort-int8": "ORT quantize_static",
         "ov-nncf-int8": "NNCF + OpenVINO INT8", "ov-nncf-mixed": "NNCF mixed + transformer, OpenVINO",
         "ov-nncf-hybrid": "NNCF hybrid (optimum-intel), OpenVINO",
         "torch-fp32": "PyTorch eager"}
SIZE = {"small": "5 M parameters", "mid": "47 M parameters", "full": "400.9 M parameters (LDM-4 cin256-v2)"}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="speed_<size>.json files from benchmarks/speed_at_size.py")
    ap.add_argument("--out", default="docs/img/speed.png")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in args.json]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        batches = list(r["batches"])
        names = [k for k in ORDER if all(k in r["batches"][b] for b in batches)]
        width = 0.8 / len(batches)
        for j, bt in enumerate(batches):
            vals = [r["batches"][bt][k]["vs_ort_fp32"] for k in names]
            ys = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(names))]
            bars = ax.barh(ys, vals, height=width, label=f"batch {bt}")
            for bar, v in zip(bars, vals):
                ax.text(v + 0.03, bar.get_y() + bar.get_height() / 2, f"{v:.2f}", va="center", fontsize=7)
        fpp = r.get("float_precision", {})  # OpenVINO models: what their float parts ran in
        ax.set_yticks(range(len(names)), [LABEL.get(k.removesuffix("@f32"), "ptqd " + k.replace("-openvino", " (OpenVINO)")
                                                    .removesuffix("@f32")) + (f", {fpp[k]} float" if k in fpp else "")
                                          for k in names])
        ax.invert_yaxis()
        ax.axvline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("x ONNX Runtime FP32 (higher is faster)")
        ax.set_title(f"{SIZE.get(r['size'], r['size'])}, {r['threads']} threads, median of {r['runs']}",
                     fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_xlim(0, 1.15 * max(r["batches"][b][k]["vs_ort_fp32"] for b in batches for k in names))
        ax.annotate(r["machine"], (0, 0), (0, -36), xycoords="axes fraction", textcoords="offset points",
                    fontsize=6, va="top")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
