"""Why NNCF's OpenVINO INT8 graph is faster than ptqd's: where each puts its quantizers, and what ptqd's own
OpenVINO graph gains from each step towards NNCF's layout (issue 21, item 2). A study, not an engine: the
variants below are not validated against a fake-quant model (they compute other numerics than ptqd's
calibrated precisions, e.g. without the conv outputs' requantization).

    python benchmarks/openvino_layouts.py BUNDLE [--precision w4a8] [--runs 10] [--threads 2]

Timed in one process, interleaved rounds, median of ``--runs`` after 3 warm-up, batch 1 and 2:

  ptqd            the bundle's calibration as ptqd's OpenVINO engine is built (QDQ graph -> IR, i4 weights)
  ptqd-no-out     the same without the conv outputs' requantization (Q/DQ on conv and matmul inputs only)
  ptqd-no-out-sym the same with symmetric activation grids (zero point 0, or 128 for signed tensors)
  nncf-default    NNCF quantize() with its default recipe on the bundle's calibration inputs (8 items)
  nncf-mixed      NNCF quantize(), mixed preset and transformer model type

Then, for NNCF's default graph: every FakeQuantize by (producer op, consumer ops, grid), the census that
says which tensors NNCF keeps in int8 between layers; and the executed-graph summary of each variant.
Needs openvino and nncf.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import tempfile
from pathlib import Path

import numpy as np


def symmetric(a):
    """The activation quantizer ``a`` on a symmetric grid covering the same range (zero point 0 for non-negative
    tensors, else the middle of the unsigned grid)."""
    from ptqd.calib.quant import ActQuant

    lo, hi = a.range
    if lo >= 0:
        return ActQuant(hi / a.qmax, 0, a.bits)
    half = 2 ** (a.bits - 1)
    return ActQuant(max(-lo, hi) / (half - 1), half, a.bits)


def fq_census(model) -> list[tuple[int, tuple]]:
    """((producer op, consumer ops, grid, levels), count) of every activation FakeQuantize, most frequent first."""
    cnt: collections.Counter = collections.Counter()
    for o in model.get_ordered_ops():
        if o.get_type_name() != "FakeQuantize":
            continue
        p = o.input(0).get_source_output().get_node()
        if p.get_type_name() == "Constant":
            continue
        cons = tuple(sorted({t.get_node().get_type_name() for t in o.output(0).get_target_inputs()} - {"ShapeOf"}))
        il = o.input(1).get_source_output().get_node().get_data()
        ih = o.input(2).get_source_output().get_node().get_data()
        grid = "unsigned" if np.all(il == 0) else ("symmetric" if np.allclose(-il, ih, rtol=0.01) else "asymmetric")
        cnt[(p.get_type_name(), cons, grid, o.get_attributes()["levels"])] += 1
    return cnt.most_common()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="w4a8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import contextlib
    import sys

    import nncf
    import openvino as ov

    from ptqd.bundle import Bundle, layout
    from ptqd.engines.openvino import OvRunner, convert_qdq
    from ptqd.engines.qdq import write_qdq
    from ptqd.engines.runner import round_robin
    from ptqd.facts import seeded_unet_inputs
    from ptqd.resources import cpu_description
    from ptqd.stages.common import calib_layers

    b = Bundle.open(args.bundle)
    layers = calib_layers(b, args.precision, 0, len(layout.calib_buckets(b)))
    variants = {"ptqd": layers,
                "ptqd-no-out": [dataclasses.replace(lq, act_out=None) for lq in layers],
                "ptqd-no-out-sym": [dataclasses.replace(lq, act_out=None, act_in=symmetric(lq.act_in)) for lq in layers]}
    runners = {}
    with tempfile.TemporaryDirectory(prefix="ptqd-ovl-") as tmp:
        for name, ls in variants.items():
            qdq = Path(tmp) / f"{name}.qdq.onnx"
            write_qdq(b.path(layout.UNET_ONNX), ls, qdq)
            convert_qdq(qdq, Path(tmp) / f"{name}.xml.gz")
            runners[name] = OvRunner(Path(tmp) / f"{name}.xml.gz", args.threads)  # read whole: the folder goes away
        fp = ov.Core().read_model(str(b.path(layout.UNET_ONNX)))
        data = np.load(b.path(layout.CALIB_FEEDS))
        names = [i.get_any_name() for i in fp.inputs]
        idx = np.linspace(0, len(data["t"]) - 1, 8).round().astype(int)
        items = [{n: data[n][i:i + 1] for n in names} for i in idx]
        with contextlib.redirect_stdout(sys.stderr):
            default = nncf.quantize(fp, nncf.Dataset(items), subset_size=len(items))
            mixed = nncf.quantize(fp, nncf.Dataset(items), subset_size=len(items), preset=nncf.QuantizationPreset.MIXED,
                                  model_type=nncf.ModelType.TRANSFORMER)
        runners["nncf-default"] = OvRunner("nncf-default", args.threads, model=default)
        runners["nncf-mixed"] = OvRunner("nncf-mixed", args.threads, model=mixed)
        print(f"{b.root.name}, {args.precision}; {cpu_description()}; OpenVINO {ov.__version__}, NNCF {nncf.__version__}; "
              f"{args.threads} threads, interleaved rounds, median of {args.runs} after 3 warm-up")
        print(f"{'graph':16s} {'batch 1 ms':>10s} {'x NNCF best':>11s} {'batch 2 ms':>10s} {'x NNCF best':>11s}")
        med = {}
        for batch in (1, 2):
            f = seeded_unet_inputs(b.facts, batch, 501.0, 0)
            call = (f["x"], f["t"], f.get("context"))
            t = round_robin({k: (lambda r=r: r.infer(*call)) for k, r in runners.items()}, runs=args.runs)
            med[batch] = {k: 1e3 * float(np.median(v)) for k, v in t.items()}
        best = {bt: min(med[bt]["nncf-default"], med[bt]["nncf-mixed"]) for bt in med}
        for k in runners:
            print(f"{k:16s} {med[1][k]:10.2f} {best[1] / med[1][k]:11.3f} {med[2][k]:10.2f} {best[2] / med[2][k]:11.3f}")
        f = seeded_unet_inputs(b.facts, 1, 501.0, 0)
        print("\nexecuted graph at batch 1 (OpenVINO PERF_COUNT, mean of 3): int8 / float convs+matmuls, reorders, "
              "layer ms, time shares")
        for k in ("ptqd", "ptqd-no-out", "ptqd-no-out-sym", "nncf-default"):
            r = runners[k]
            s = r.executed_summary({n: f[n] for n in r.input_names}, runs=3)
            shares = ", ".join(f"{a} {v:.0%}" for a, v in s["time_share"].items())
            print(f"  {k:16s} {s['compute_layers']}  reorders {s['reorders']}  {s['layer_ms']:.1f} ms  ({shares})")
        print("\nNNCF default: activation FakeQuantize by producer -> consumers (grid, levels)")
        for (prod, cons, grid, levels), n in fq_census(default):
            print(f"  {n:4d}  {prod} -> {', '.join(cons)}  ({grid}, {levels})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
