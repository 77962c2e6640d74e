"""Attention matmuls on 8-bit inputs (``ptqd calibrate --attention int8``) against float attention: speed on ONNX
Runtime and OpenVINO, and the error each adds, from one calibration.

    python benchmarks/attention_int8.py BUNDLE [--ort-precisions w8a8] [--ov-precisions w8a8,w4a8] [--runs 10]
        [--ov-modes float,qk,int8,qk@source,int8@source] [--no-nncf] [--error-items 8] [--json FILE]

BUNDLE must be calibrated with ``--attention int8`` (or ``qk``). From its calibration this writes, per precision
and backend, the engine with float attention (what a calibration without ``--attention`` builds: on ONNX Runtime
with the fused MultiHeadAttention kernel), with Q·Kᵀ only on 8-bit inputs (``qk``) and with both attention matmuls
on 8-bit inputs (``int8``); the layers' quantizers are the same in all three. On OpenVINO ``@source`` variants put
the Q/DQ pairs where q/k/v and P are made (``write_qdq(attention_at="source")``, what ``ptqd build --backend
openvino`` writes). An empty ``--ort-precisions`` or ``--ov-precisions`` skips that backend. It adds, where present
and installed,
the bundle's ort-int8 engine (ONNX Runtime's quantize_static) and NNCF + OpenVINO INT8 (default recipe; mixed
preset + transformer model type) on 8 of the calibration inputs. All engines run interleaved in one process, 2
threads, median of ``--runs`` after warm-up, batch 1 and 2. The error column is the fake-quant model's ε rel-L2
against FP on ``--error-items`` calibration inputs (float, qk and int8 attention).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--ort-precisions", default="w8a8")
    ap.add_argument("--ov-precisions", default="w8a8,w4a8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ov-modes", default="float,qk,int8,qk@source,int8@source",
                    help="OpenVINO variants: float, qk, int8; @source = the Q/DQ pairs moved up through layout ops to "
                         "where q/k/v and P are made (write_qdq's attention_at)")
    ap.add_argument("--no-nncf", action="store_true")
    ap.add_argument("--error-items", type=int, default=8)
    ap.add_argument("--json", help="write the medians and errors here")
    args = ap.parse_args(argv)

    from ptqd.bundle import Bundle, layout
    from ptqd.calib.attention import softmax_fed
    from ptqd.engines import graph_opt
    from ptqd.engines.onnxruntime import OrtRunner, build_engine
    from ptqd.engines.qdq import write_qdq
    from ptqd.engines.runner import round_robin
    from ptqd.facts import seeded_unet_inputs
    from ptqd.resources import cpu_description
    from ptqd.stages.common import calib_attention, calib_layers

    b = Bundle.open(args.bundle)
    fp = b.path(layout.UNET_ONNX)
    ort_ps = [p for p in args.ort_precisions.split(",") if p]
    ov_ps = [p for p in args.ov_precisions.split(",") if p]
    quants = {p: calib_attention(b, p) for p in set(ort_ps + ov_ps)}
    if not all(quants.values()):
        raise SystemExit(f"{b.root} has no quantized attention matmuls: calibrate it with --attention int8")
    pv = softmax_fed(fp)
    modes = {"float": lambda q: [], "qk": lambda q: [m for m in q if m.name not in pv], "int8": lambda q: q}
    runners, engines = {}, {}
    tmp = tempfile.TemporaryDirectory(prefix="ptqd-attn8-")
    work = Path(tmp.name)
    print(f"writing engines in {work}", file=sys.stderr)
    for p in ort_ps:
        layers = calib_layers(b, p)
        for mode, pick in modes.items():
            qdq, eng = work / f"ort.{p}.{mode}.qdq.onnx", work / f"ort.{p}.{mode}.onnx"
            wrote = write_qdq(fp, layers, qdq, rewrite=lambda m: graph_opt.optimize_for_ort(m, fp),
                              attention=pick(quants[p]), low_bits_clip="int")
            build_engine(qdq, eng)
            qdq.unlink()
            engines[f"ort {p} {mode}"] = (eng, wrote["graph"].get("fused_attention", 0))
            runners[f"ort {p} {mode}"] = OrtRunner(eng, args.threads)
    peer = layout.ort_engine("ort-int8", 0, 1)[1]
    if ort_ps and peer in b.files:
        runners["ort ort-int8"] = OrtRunner(b.path(peer), args.threads)
    if ov_ps:
        from ptqd.engines.openvino import OvRunner, convert_qdq, openvino_layers

        for p in ov_ps:
            layers = openvino_layers(calib_layers(b, p))
            for spec in args.ov_modes.split(","):
                mode, _, at = spec.partition("@")
                pick = modes[mode]
                qdq, xml = work / f"ov.{p}.{spec}.qdq.onnx", work / f"ov.{p}.{spec}.xml.gz"
                write_qdq(fp, layers, qdq, attention=pick(quants[p]), attention_at=at or "input")
                mode = spec
                convert_qdq(qdq, xml)
                qdq.unlink()
                runners[f"ov {p} {mode}"] = OvRunner(xml, args.threads)
        if not args.no_nncf:
            from ptqd.tools.peers import openvino_peers

            notes: list = []
            for name, (runner, _) in openvino_peers(b, args.threads, 8, notes).items():
                if name == "ov-fp32":
                    runner.close()
                else:
                    runners[f"ov {name}"] = runner
            print("\n".join(notes), file=sys.stderr)
    med: dict = {}
    for batch in (1, 2):
        f = seeded_unet_inputs(b.facts, batch, 501.0, 0)
        call = (f["x"], f["t"], f.get("context"))
        t = round_robin({k: (lambda r=r: r.infer(*call)) for k, r in runners.items()}, runs=args.runs)
        med[batch] = {k: 1e3 * float(np.median(v)) for k, v in t.items()}
    for r in runners.values():
        with contextlib.suppress(Exception):
            r.close()
    errors = fake_quant_errors(b, sorted(set(ort_ps + ov_ps)), quants, modes, args.error_items)
    print(f"\n{b.root.name}: {cpu_description()}; {args.threads} threads, interleaved rounds, median of {args.runs} "
          "after warm-up")
    print(f"{'engine':24s} {'batch 1 ms':>10s} {'x float':>8s} {'batch 2 ms':>10s} {'x float':>8s}")
    for k in runners:
        parts = k.split()
        base = " ".join(parts[:2] + ["float"]) if parts[-1].split("@")[0] in modes else None
        ratio = [med[bt][base] / med[bt][k] if base in med[bt] else float("nan") for bt in (1, 2)]
        print(f"{k:24s} {med[1][k]:10.2f} {ratio[0]:8.3f} {med[2][k]:10.2f} {ratio[1]:8.3f}")
    print("\nfake-quant ε rel-L2 vs FP (calibration inputs):")
    for p, e in errors.items():
        print(f"  {p}: " + ", ".join(f"{m} {v:.4f}" for m, v in e.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": cpu_description(), "bundle": str(b.root), "median_ms": med,
                                               "fused_attention": {k: v[1] for k, v in engines.items()},
                                               "eps_rel_l2_vs_fp": errors}, indent=1))
    tmp.cleanup()
    return 0


def fake_quant_errors(b, precisions, quants, modes, items: int) -> dict:
    """{precision: {mode: ε rel-L2 vs FP}} of the fake-quant model on ``items`` calibration inputs."""
    from ptqd.bundle import layout
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.stages.common import calib_layers, load_source

    loaded = load_source(b)
    data = dict(np.load(b.path(layout.CALIB_FEEDS)))
    idx = np.linspace(0, len(data["t"]) - 1, items).round().astype(int)
    c = data.get("context")
    calls = [(data["x"][i:i + 1], data["t"][i:i + 1], None if c is None else c[i:i + 1]) for i in idx]
    ref = np.concatenate([TorchRunner(loaded.unet)(*a) for a in calls])
    out: dict = {}
    for p in precisions:
        layers = calib_layers(b, p)
        out[p] = {}
        for mode, pick in modes.items():
            r = TorchRunner(fake_quant_model(loaded.unet, layers, pick(quants[p])))
            e = np.concatenate([r(*a) for a in calls])
            out[p][mode] = float(np.linalg.norm(e - ref) / np.linalg.norm(ref))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
