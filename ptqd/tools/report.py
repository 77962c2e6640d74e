"""``ptqd report``: the bundle's visual reports, regenerated from what the bundle holds.

reports/
  samples_side_by_side.png   FP32, each engine and the plan on the same seeds (one row each)
  correction.png             k_t, bias_t[c] and σ_q,t per precision over the calibrated steps
  plan.png                   the plan over the steps and the SNR curves behind it (SNR_F and each
                             precision's corrected SNR_Q, log scale)
  eval.json, bench.json      quality and speed (``--eval`` / ``--bench`` rerun them)
  index.md                   what is there, with the headline numbers
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.runtime.loader import default_labels, open_decoder, sampler_config, step_engines
from ptqd.runtime.pipeline import decode, grid, sample_latents
from ptqd.tools.bench import bench
from ptqd.tools.evaluate import evaluate


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def side_by_side(b, specs: list[str], num: int = 10, seed: int = 0, steps: int = 20) -> tuple[bytes, list[str]]:
    """One row per spec, the same seeds and classes in every column (PNG bytes, row labels)."""
    from PIL import Image, ImageDraw

    facts = b.facts
    table = layout.class_embedding(b)
    decoder = open_decoder(b)
    cfg = sampler_config(facts, steps, 0.0, 3.0)
    labels = default_labels(facts, None, num)
    rows, names, cache = [], [], {}
    for spec in specs:
        eng, label = step_engines(b, spec, "auto", cache=cache)
        rows.append(decode(decoder, sample_latents(eng, facts, table, labels, np.arange(num), seed, cfg),
                           facts.scale_factor))
        names.append(label)
    scale = max(1, 64 // rows[0].shape[1])
    g = grid(np.concatenate(rows), cols=num, scale=scale)
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert("RGB")
    pad = 110
    canvas = Image.new("RGB", (img.width + pad, img.height), (255, 255, 255))
    canvas.paste(img, (pad, 0))
    draw = ImageDraw.Draw(canvas)
    h = (img.height - 2) / len(rows)
    for i, name in enumerate(names):
        draw.text((4, 2 + h * i + h / 2 - 6), name, fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue(), names


def correction_plot(corr: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    for p, rec in corr["precisions"].items():
        steps = rec["steps"]
        t = [s["t"] for s in steps]
        ax[0].plot(t, [s["raw"]["k_raw"] for s in steps], "--", alpha=0.5, label=f"{p} fitted slope")
        ax[0].plot(t, [s["k"] for s in steps], "o-", ms=3, label=f"{p} k_t applied")
        bias = np.array([s["raw"]["bias"] for s in steps])
        for c in range(bias.shape[1]):
            ax[1].plot(t, bias[:, c], label=f"{p} c{c}")
        ax[2].plot(t, [s["sigma_q"] for s in steps], "o-", ms=3, label=p)
    for a, title in zip(ax, ("correlation k_t (slope of error on eps)", "bias_t[c] (fitted)", "residual std sigma_q,t")):
        a.set_title(title, fontsize=10)
        a.set_xlabel("timestep t")
        a.invert_xaxis()
        a.grid(alpha=0.3)
    ax[0].legend(fontsize=7)
    ax[1].legend(fontsize=6, ncol=2)
    ax[2].legend(fontsize=7)
    ax[2].set_yscale("log")
    return _png(fig)


def plan_plot(plan: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = plan["steps"]
    t = [s["t"] for s in steps]
    precs = plan["precisions_by_cost"]
    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax[0].plot(t, [s["snr_f"] for s in steps], "k-", lw=2, label="SNR_F = abar/(1-abar) (sample)")
    for p in precs:
        ax[0].plot(t, [s["snr_q"][p] for s in steps], "o-", ms=3, label=f"SNR_Q {p} (corrected)")
    ax[0].set_yscale("log")
    ax[0].set_title(f"step-aware mixed precision: {plan['criterion']}", fontsize=8)
    ax[0].legend(fontsize=7)
    ax[0].grid(alpha=0.3)
    ax[1].step(t, [precs.index(s["precision"]) for s in steps], where="mid")
    ax[1].set_yticks(range(len(precs)), precs)
    ax[1].set_xlabel("timestep t (sampling runs right to left)")
    ax[1].invert_xaxis()
    return _png(fig)


@writes_bundle()
def report(bundle, num: int = 10, run_eval: bool = False, eval_num: int = 200, run_bench: bool = False,
           progress: bool | None = None) -> dict[str, Any]:
    """Regenerate reports/ (see the module doc). Returns {"files": [...], ...}."""
    b = Bundle.open(bundle)
    built = layout.built(b)
    specs = ["fp32"] + sorted(built, key=lambda p: (p != "ort-int8", p)) + (["auto"] if b.has(layout.PLAN_JSON) else [])
    if run_eval:
        evaluate(b.root, precisions=specs[1:], num=eval_num, progress=progress)
    bench_json = None
    if run_bench:
        bench_json = bench(b.root, memory=True)
    b = Bundle.open(bundle)
    files: dict[str, bytes] = {}
    labels: list[str] = []
    if b.has(layout.FIRST_STAGE_ONNX):
        files["reports/samples_side_by_side.png"], labels = side_by_side(b, specs, num)
    if b.has(layout.CORRECTION_JSON):
        files["reports/correction.png"] = correction_plot(b.read_json(layout.CORRECTION_JSON))
    if b.has(layout.PLAN_JSON):
        files["reports/plan.png"] = plan_plot(b.read_json(layout.PLAN_JSON))
    if bench_json is not None:
        files["reports/bench.json"] = json.dumps(bench_json, indent=2).encode()
    index = ["# ptqd report", "", f"bundle: `{b.root.name}`", ""]
    if labels:
        index += ["## Samples (same seeds, one row per engine)", "", "![samples](samples_side_by_side.png)", "",
                  "rows: " + ", ".join(labels), ""]
    if b.has("reports/eval.json"):
        ev = b.read_json("reports/eval.json")
        index += ["## Quality (reports/eval.json)", "", "| row | FD | class acc | PSNR vs FP | BOPs saving |",
                  "|---|---|---|---|---|"]
        for r in ev["rows"]:
            index.append(f"| {r['precision']} | {_f(r.get('fd'))} | {_f(r.get('class_acc'), pct=True)} | "
                         f"{_f(r.get('psnr_vs_fp'))} | {_f(r.get('bops_saving'))}x |")
        index.append("")
    for name, title in (("correction.png", "PTQD correction"), ("plan.png", "Mixed-precision plan")):
        if f"reports/{name}" in files:
            index += [f"## {title}", "", f"![{title}]({name})", ""]
    if bench_json is not None or b.has("reports/bench.json"):
        index += ["## Speed", "", "reports/bench.json (`ptqd bench`)", ""]
    files["reports/index.md"] = "\n".join(index).encode()
    with Bundle.transaction(b.root) as w:
        for rel, data in files.items():
            w.write_bytes(rel, data)
    return {"bundle": str(b.root), "files": sorted(files)}


def _f(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.2f}"


__all__ = ["report", "side_by_side", "correction_plot", "plan_plot"]
