"""W4A4 with run-time activation ranges as a graph ONNX Runtime and OpenVINO run: is it right, and what it costs.

    python benchmarks/w4a4_block_engine.py BUNDLE [--group 16] [--runs 10] [--threads 2] [--check]
                                          [--eval N [--eta 0] [--seed 0] [--plan]] [--no-latency]
                                          [--backends ort,openvino] [--batches 1,2] [--json out.json]

``w4a4_dynamic.py`` found that a 4-bit activation range per pixel/token and group of 16 channels (``g16``) makes the
demo's w4a4 hold, in torch fake-quant. This script builds that model as an ONNX graph of stock operators and runs
it on the two CPU backends. It takes the bundle's w4a4 QDQ graph (``engines/onnxruntime/w4a4.qdq.onnx``, what
``ptqd build`` fuses into its ONNX Runtime engine) and replaces each 4-bit activation quantizer (Clip,
QuantizeLinear, DequantizeLinear: one calibrated range per tensor) by one whose ranges come from the tensor at run
time: asymmetric 4-bit, min/max with 0 inside, per pixel/token and group of ``--group`` channels (Reshape,
ReduceMin/ReduceMax, Div, Round, Clip, ...; the group must divide the channels, the other quantizers stay). The
layers they feed then run in float, on their 4-bit weights dequantized once into float initializers (the best
case for a float layer). Everything else (8-bit layers, attention, requantized outputs) is the bundle's graph.

1. ``--check``: the graph on ONNX Runtime against ``w4a4_dynamic.py``'s torch model of the same mode, on the
   calibration inputs ``ptqd build`` validates with (relative L2 of ε), beside the bundle's w4a4 engine against
   its exact fake-quant model and the graph against that exact model (the difference the ranges make).
2. Latency (unless ``--no-latency``), interleaved, median of ``--runs`` after warm-up, batch 1 and 2: FP32, w4a8,
   w4a4 and the graph on ONNX Runtime; on OpenVINO (where installed) the bundle's w4a8/w4a4 engines if it has
   them, FP32 and the graph read from ONNX, in f32 (the graph's numerics) and, when the engines' float parts are
   bf16, in bf16 too.
3. ``--eval N``: the graph on ONNX Runtime and OpenVINO (f32, and bf16 where this CPU has it) scored as ``ptqd
   eval`` does (paired PSNR and FD vs FP, class accuracy; N samples from ``--seed``, 20 DDIM steps, η ``--eta``,
   no PTQD correction), beside the exact w4a8 model and the bundle's w4a8 and w4a4 engines. ``--plan``: also the
   bundle's step plan (``ptqd plan``), its w4a4 steps on the w4a4 engine and on the graph.

A kernel that quantizes and multiplies in one pass would do better than these stock operators; what they show is
the cost on the backends ptqd has, whose fastest arithmetic (int8, VNNI/AMX) is the same for 4-bit values.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from speed_at_size import _has_openvino, _machine  # noqa: E402
from w4a4_dynamic import print_rows, w4a4_plan  # noqa: E402


def _const(name: str, value) -> object:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(value), name)


def dynamic_quantizer(x: str, y: str, cdim_last: bool, channels: int, group: int, tag: str, bits: int = 4):
    """(nodes, initializers) computing ``y``: ``x`` on an asymmetric ``bits``-bit grid whose range is min/max
    (0 inside) of each group of ``group`` channels at each pixel (``cdim_last`` False: NCHW/NCL) or token
    (True: channels last), as ``w4a4_outliers.dynamic_act_quant(cdim, group, 1.0)`` computes it."""
    from onnx import helper

    top = float(2 ** bits - 1)
    n = f"{tag}_dq"
    # channels last (any rank): rows of ``group``; channels first (NCHW, NCL): [N, C/group, group, pixels]
    shape = [-1, group] if cdim_last else [0, channels // group, group, -1]
    axis = 1 if cdim_last else 2
    inits = [_const(f"{n}_shape", np.array(shape, np.int64)), _const(f"{n}_axis", np.array([axis], np.int64)),
             _const(f"{n}_zero", np.float32(0.0)),
             _const(f"{n}_eps", np.float32(1e-12)), _const(f"{n}_top", np.float32(top))]
    nd = helper.make_node
    nodes = [
        nd("Reshape", [x, f"{n}_shape"], [f"{n}_g"]),
        nd("ReduceMin", [f"{n}_g", f"{n}_axis"], [f"{n}_min"], keepdims=1),
        nd("ReduceMax", [f"{n}_g", f"{n}_axis"], [f"{n}_max"], keepdims=1),
        nd("Min", [f"{n}_min", f"{n}_zero"], [f"{n}_lo"]),
        nd("Max", [f"{n}_max", f"{n}_zero"], [f"{n}_hi"]),
        nd("Sub", [f"{n}_hi", f"{n}_lo"], [f"{n}_span"]),
        nd("Div", [f"{n}_span", f"{n}_top"], [f"{n}_s0"]),
        nd("Max", [f"{n}_s0", f"{n}_eps"], [f"{n}_s"]),
        nd("Neg", [f"{n}_lo"], [f"{n}_nlo"]),
        nd("Div", [f"{n}_nlo", f"{n}_s"], [f"{n}_z0"]),
        nd("Round", [f"{n}_z0"], [f"{n}_z"]),
        nd("Div", [f"{n}_g", f"{n}_s"], [f"{n}_r0"]),
        nd("Round", [f"{n}_r0"], [f"{n}_r"]),
        nd("Add", [f"{n}_r", f"{n}_z"], [f"{n}_qz"]),
        nd("Clip", [f"{n}_qz", f"{n}_zero", f"{n}_top"], [f"{n}_q"]),
        nd("Sub", [f"{n}_q", f"{n}_z"], [f"{n}_c"]),
        nd("Mul", [f"{n}_c", f"{n}_s"], [f"{n}_v"]),
        nd("Shape", [x], [f"{n}_xshape"]),
        nd("Reshape", [f"{n}_v", f"{n}_xshape"], [y]),
    ]
    return nodes, inits


def _dequantized(dq, inits: dict) -> np.ndarray:
    """A weight DequantizeLinear of initializers, computed: (q − zp) · scale along its axis."""
    from onnx import numpy_helper

    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] else 0.0
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if np.ndim(scale) == 1 and q.ndim > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = np.reshape(zp, shape) if np.ndim(zp) == 1 else zp
    return ((q - zp) * scale).astype(np.float32)


def block_graph(qdq_path, out_path, group: int = 16) -> dict:
    """Write ``qdq_path`` with its 4-bit activation quantizers taken at run time (see the module doc) to
    ``out_path``; returns how many quantizers and layers it rewrote and which it kept, and why. A quantizer that
    several layers share (q/k/v of one input) is rewritten once for all of them. Raises ValueError for a graph
    below opset 18 (ReduceMin/ReduceMax take their axes as an input from 18 on)."""
    import onnx
    from onnx import numpy_helper

    if group < 1:
        raise ValueError(f"group {group}: channels per range must be at least 1")
    m = onnx.load(str(qdq_path))
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        raise ValueError(f"{qdq_path}: opset {opset}; the run-time quantizer needs opset 18 or later")
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    prod = {o: nd for nd in g.node for o in nd.output}
    users = defaultdict(list)
    for nd in g.node:
        for i in nd.input:
            users[i].append(nd)
    graph_outputs = {o.name for o in g.output}

    def const(name):
        return numpy_helper.to_array(inits[name]).astype(np.float64) if name in inits else None

    def weight_dq(nd):
        w = prod.get(nd.input[1]) if len(nd.input) > 1 else None
        ok = w is not None and w.op_type == "DequantizeLinear" and w.input[0] in inits
        return w if ok and not any(a.name == "block_size" for a in w.attribute) else None

    def levels(clip, q) -> int | None:
        """How many levels of the QuantizeLinear's grid the Clip leaves (it clips the integers after it, or the
        floats before it on grid points); None for a Clip that is not on the grid (the model's own, e.g. ReLU6)."""
        lo, hi = (const(clip.input[i]) if len(clip.input) > i and clip.input[i] else None for i in (1, 2))
        if lo is None or hi is None or np.size(lo) != 1 or np.size(hi) != 1:
            return None
        if prod.get(clip.input[0]) is not q:
            scale = const(q.input[1])
            if scale is None or np.size(scale) != 1 or not float(scale.ravel()[0]) > 0:
                return None
            lo, hi = lo / scale, hi / scale
        lo, hi = float(np.ravel(lo)[0]), float(np.ravel(hi)[0])
        on_grid = abs(lo - round(lo)) < 1e-3 and abs(hi - round(hi)) < 1e-3 and hi >= lo
        return int(round(hi - lo)) + 1 if on_grid else None

    replace, drop, kept, folded, layers = {}, set(), [], {}, 0
    for last in g.node:
        # a 4-bit activation quantizer: Clip on the floats before the QuantizeLinear, or on its integers after it
        first = prod.get(last.input[0]) if last.op_type in ("Clip", "QuantizeLinear") and last.input else None
        if first is None or {first.op_type, last.op_type} != {"Clip", "QuantizeLinear"} \
                or len(users[first.output[0]]) != 1:
            continue  # an 8-bit activation quantizer (no Clip), or a weight's
        clip, q = (first, last) if first.op_type == "Clip" else (last, first)
        name = last.output[0]
        n_levels = levels(clip, q)
        if n_levels is None or n_levels >= 256:
            continue  # the model's own Clip in front of an 8-bit quantizer
        if n_levels != 16:
            kept.append((name, f"its Clip leaves {n_levels} levels, not 16"))
            continue
        dqs = users[name]
        outs = {dq.output[0] for dq in dqs}
        if {name, first.output[0], *outs} & graph_outputs:
            kept.append((name, "a graph output reads it"))
            continue
        consumers = [c for dq in dqs for c in users[dq.output[0]]]
        if not consumers or not all(dq.op_type == "DequantizeLinear" for dq in dqs) or not all(
                c.op_type in ("Conv", "MatMul") and c.input[0] in outs and weight_dq(c) for c in consumers):
            kept.append((name, "feeds something other than a Conv/MatMul on per-channel 4-bit weights"))
            continue
        conv = consumers[0].op_type == "Conv"
        if any((c.op_type == "Conv") != conv for c in consumers):
            kept.append((name, "feeds both convs and matmuls"))
            continue
        shapes = {numpy_helper.to_array(inits[weight_dq(c).input[0]]).shape[1 if conv else 0] for c in consumers}
        ch = shapes.pop() if len(shapes) == 1 else None
        grouped = any(next((a.i for a in c.attribute if a.name == "group"), 1) != 1 for c in consumers)
        if ch is None or grouped or ch % group:
            kept.append((name, f"{ch} channels, not a multiple of {group} (or a grouped conv)"))
            continue
        y = f"blk{len(replace)}_y"
        replace[id(last)] = dynamic_quantizer(q.input[0] if first is q else clip.input[0], y, not conv, ch, group,
                                              f"blk{len(replace)}")
        drop.update([id(first), *map(id, dqs)])
        layers += len(consumers)
        for c in consumers:
            c.input[0] = y
            w = weight_dq(c)
            if w.output[0] not in folded:
                folded[w.output[0]] = numpy_helper.from_array(_dequantized(w, inits), w.output[0] + "_f32")
            c.input[1] = folded[w.output[0]].name
    nodes, new_inits = [], list(folded.values())
    for nd in g.node:
        if id(nd) in replace:
            more, ci = replace[id(nd)]
            nodes.extend(more)
            new_inits.extend(ci)
        elif id(nd) not in drop:
            nodes.append(nd)
    live = {i for nd in nodes for i in nd.input}
    nodes = [nd for nd in nodes if not (nd.op_type == "DequantizeLinear" and nd.output[0] in folded
                                        and nd.output[0] not in live)]  # weights now folded and unused
    del g.node[:]
    g.node.extend(nodes)
    live = {i for nd in nodes for i in nd.input}
    keep = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(keep + [i for i in new_inits if i.name in live])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing external data file
    big = sum(i.ByteSize() for i in g.initializer) > 1.8e9
    onnx.save(m, str(out_path), save_as_external_data=big, location=data.name if big else None)
    return {"quantizers": len(replace), "layers": layers, "kept": kept, "group": group}


def _ov_runner(path, threads: int, precision: str):
    from ptqd.engines.openvino import OvRunner, shared_core

    return OvRunner(path, threads, model=shared_core().read_model(str(path)), float_precision=precision)


def check(b, graph_path: Path, group: int, threads: int) -> dict:
    """Relative L2 of ε on the build's validation inputs: the graph against w4a4_dynamic's torch model, the
    bundle's w4a4 engine against its exact fake-quant model, the graph against that exact model, and the graph and
    the torch model against FP (ptqd's rounding-cascade rule: an engine whose float sums round differently passes
    when it is at most CASCADE_SLACK times further from FP than its fake-quant model)."""
    import torch

    from w4a4_dynamic import mode_model

    from ptqd import api
    from ptqd.bundle import layout
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.compare import CASCADE_SLACK, rel_l2, validation_inputs
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.stages.common import calib_layers, load_source

    torch.set_grad_enabled(False)
    loaded = load_source(b)
    w4a4 = calib_layers(b, "w4a4")
    model, covered = mode_model(loaded, w4a4, f"g{group}", 1.0)  # main checked that w4a4_dynamic has the mode
    refs = {"torch g": TorchRunner(model, "cpu"), "exact": TorchRunner(fake_quant_model(loaded.unet, w4a4), "cpu"),
            "fp": TorchRunner(loaded.unet, "cpu")}
    runs = {"graph": OrtRunner(graph_path, threads), "engine": api.open_engine(b, "w4a4", threads)}
    out = defaultdict(list)
    for f in validation_inputs(dict(np.load(b.path(layout.CALIB_FEEDS)))):
        call = (f["x"], f["t"], f.get("context"))
        r = {k: v(*call) for k, v in {**refs, **runs}.items()}
        out["graph vs torch g"].append(rel_l2(r["graph"], r["torch g"]))
        out["engine vs exact"].append(rel_l2(r["engine"], r["exact"]))
        out["graph vs exact"].append(rel_l2(r["graph"], r["exact"]))
        out["graph vs fp"].append(rel_l2(r["graph"], r["fp"]))
        out["torch g vs fp"].append(rel_l2(r["torch g"], r["fp"]))
    res = {k: {"median": float(np.median(v)), "worst": float(max(v))} for k, v in out.items()}
    cascade = res["graph vs fp"]["median"] <= CASCADE_SLACK * res["torch g vs fp"]["median"]
    return {"torch_layers_covered": covered, **res, "cascade_rule_passed": bool(cascade)}


def latency(b, graph_path: Path, group: int, threads: int, runs: int, warmup: int, backends=("ort", "openvino"),
            batches=(1, 2), log=print) -> dict:
    from ptqd import api
    from ptqd.bundle import layout
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.runner import round_robin
    from ptqd.facts import seeded_unet_inputs

    runners = {}
    if "ort" in backends:
        runners["fp32 ort"] = OrtRunner(b.path(layout.UNET_ONNX), threads, allow_spinning=False)
        for p in ("w4a8", "w4a4"):
            runners[f"{p} ort"] = api.open_engine(b, p, threads, allow_spinning=False)
        runners[f"w4a4 g{group} graph ort"] = OrtRunner(graph_path, threads, allow_spinning=False)
    if "openvino" in backends and not _has_openvino():
        log("OpenVINO is not installed: no OpenVINO rows")
    elif "openvino" in backends:
        ov = b.read_json("engines/openvino/build.json") if b.has("engines/openvino/build.json") else {}
        fprec = {p: ov[p].get("float_precision", "f32") for p in ("w4a8", "w4a4") if p in ov}
        for p in fprec:
            runners[f"{p} openvino ({fprec[p]})"] = api.open_engine(b, p, threads, backend="openvino")
        runners["fp32 openvino (f32)"] = _ov_runner(b.path(layout.UNET_ONNX), threads, "f32")
        runners[f"w4a4 g{group} graph openvino (f32)"] = _ov_runner(graph_path, threads, "f32")
        if "bf16" in fprec.values():
            runners["fp32 openvino (bf16)"] = _ov_runner(b.path(layout.UNET_ONNX), threads, "bf16")
            runners[f"w4a4 g{group} graph openvino (bf16)"] = _ov_runner(graph_path, threads, "bf16")
    out = {}
    for batch in batches:
        f = seeded_unet_inputs(b.facts, batch, 501.0, 0)
        call = (f["x"], f["t"], f.get("context"))
        for r in runners.values():
            r(*call)
        times = round_robin({k: (lambda r=r: r(*call)) for k, r in runners.items()}, runs, warmup)
        out[batch] = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    return out



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--group", type=int, default=16, help="channels per activation range (default 16)")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="check the graph against the torch fake-quant model")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--backends", default="ort,openvino",
                    help="latency rows of these backends (default both; at full size one at a time fits 23 GiB)")
    ap.add_argument("--batches", default="1,2", help="latency batch sizes (default 1,2)")
    ap.add_argument("--eval", type=int, default=0, metavar="N", help="score the graph on N samples (ptqd eval's way)")
    ap.add_argument("--eta", type=float, default=0.0, help="DDIM η of --eval (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed of --eval (default 0, as ptqd eval)")
    ap.add_argument("--plan", action="store_true",
                    help="--eval also runs the bundle's plan: its w4a4 steps on the w4a4 engine, and on the graph")
    ap.add_argument("--keep", help="write the graph here instead of a temporary file")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from w4a4_dynamic import MODES

    from ptqd.bundle import Bundle
    from ptqd.errors import PtqdError

    try:
        batches = [int(x) for x in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: give batch sizes separated by commas, e.g. 1,2")
    backends = args.backends.split(",")
    if args.group < 1 or min(batches) < 1 or args.runs < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--group, --batches, --runs and --threads must be positive (--warmup at least 0)")
    if set(backends) - {"ort", "openvino"}:
        ap.error(f"--backends {args.backends!r}: choose from ort, openvino")
    if args.eval < 0:
        ap.error(f"--eval {args.eval}: give a number of samples (0: no evaluation)")
    if args.plan and not args.eval:
        ap.error("--plan goes with --eval N (it adds rows to the evaluation)")
    if args.check and f"g{args.group}" not in MODES:
        ap.error(f"--check compares with w4a4_dynamic.py's mode g{args.group}, which it does not have: "
                 f"use --group {', '.join(m[1:] for m in MODES if m[1:].isdigit())}")
    try:
        b = Bundle.open(args.bundle)
    except PtqdError as e:
        ap.error(str(e))
    qdq = Path(b.root, "engines/onnxruntime/w4a4.qdq.onnx")
    if not qdq.exists():
        bucketed = sorted(qdq.parent.glob("w4a4.*.qdq.onnx"))
        ap.error(f"{qdq} not found: " + ("this study takes one w4a4 graph, and the bundle has one per timestep "
                                          f"bucket ({bucketed[0].name}, ...)" if bucketed else
                                          f"build the bundle's w4a4 engine first (ptqd build {args.bundle})"))
    if args.keep and Path(args.keep).resolve().is_relative_to(Path(b.root).resolve()):
        ap.error(f"--keep {args.keep}: write the graph outside the bundle ({b.root})")
    for out in (args.keep, args.json):
        if out and not Path(out).resolve().parent.is_dir():
            ap.error(f"{out}: its folder does not exist")
    try:
        return run(b, qdq, args)
    except (PtqdError, OSError) as e:
        ap.error(str(e))


def run(b, qdq: Path, args) -> dict:
    from ptqd.errors import UserError

    res: dict = {"machine": _machine(), "bundle": str(args.bundle)}
    batches, backends = [int(x) for x in args.batches.split(",")], args.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="ptqd-blk-") as tmp:
        graph = Path(args.keep) if args.keep else Path(tmp) / f"w4a4.g{args.group}.onnx"
        t0 = time.perf_counter()
        try:
            rec = block_graph(qdq, graph, args.group)
        except ValueError as e:
            raise UserError(str(e)) from e
        res["graph"] = {k: v for k, v in rec.items() if k != "kept"} | {"kept": len(rec["kept"])}
        print(f"graph: {rec['quantizers']} 4-bit activation quantizers taken at run time (per pixel/token and "
              f"{args.group} channels), {rec['layers']} layers in float on dequantized 4-bit weights; "
              f"{len(rec['kept'])} kept: " + "; ".join(f"{n} ({why})" for n, why in rec["kept"])
              + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.check:
            res["check"] = check(b, graph, args.group, args.threads)
            print("check (relative L2 of eps, median / worst):", flush=True)
            for k, v in res["check"].items():
                print(f"  {k}: {v}" if not isinstance(v, dict) else f"  {k:18s} {v['median']:.4f} / {v['worst']:.4f}")
        if not args.no_latency:
            lat = latency(b, graph, args.group, args.threads, args.runs, args.warmup, backends, batches)
            res["latency_ms"] = lat
            print(f"\n{args.threads} threads, interleaved, median of {args.runs} ({res['machine']})")
            print(f"{'engine':<34}" + "".join(f"{f'batch {bt} ms':>11}" for bt in batches) + f"{'x w4a8':>13}")
            first = lat[batches[0]]
            for k in first:
                ort_row = " ort" in k
                ref = next((r for r in first if r.startswith("w4a8 ") and (" ort" in r) == ort_row), None)
                rat = "/".join(f"{lat[bt][k] / lat[bt][ref]:.2f}" for bt in batches) if ref else ""
                print(f"{k:<34}" + "".join(f"{lat[bt][k]:11.1f}" for bt in batches) + f"{rat:>13}")
        if args.eval:
            res["eval"] = evaluate(b, graph, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


def evaluate(b, graph: Path, args) -> dict:
    import torch

    from ptqd import api
    from ptqd.bundle import layout
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.resources import has_native_bf16
    from ptqd.runtime.correction import StepEngines
    from ptqd.runtime.loader import default_labels, open_decoder, sampler_config
    from ptqd.stages.common import calib_layers, load_source
    from ptqd.tools.metrics import FeatureModel, evaluate_runners

    torch.set_grad_enabled(False)
    cfg = sampler_config(b.facts, 20, args.eta, b.stage("calibrate")["config"]["guidance"])
    loaded = load_source(b)
    g = f"w4a4 g{args.group} graph"
    engines = {p: api.open_engine(b, p, args.threads) for p in ("w4a8", "w4a4")}
    runners = {"fp32": TorchRunner(loaded.unet, "cpu"),
               "exact w4a8": TorchRunner(fake_quant_model(loaded.unet, calib_layers(b, "w4a8")), "cpu"),
               "w4a8 engine (ort)": engines["w4a8"], "w4a4 engine (ort)": engines["w4a4"],
               f"{g} (ort)": OrtRunner(graph, args.threads)}
    if _has_openvino():
        for prec in ("f32", "bf16") if has_native_bf16() else ("f32",):
            runners[f"{g} (ov {prec})"] = _ov_runner(graph, args.threads, prec)
    if args.plan:
        try:
            plan = w4a4_plan(b, cfg)
        except ValueError as e:
            raise SystemExit(str(e)) from e
        runners["plan: engines (ort)"] = StepEngines(engines, plan)
        runners[f"plan: w4a4 steps on {g} (ort)"] = StepEngines({**engines, "w4a4": runners[f"{g} (ort)"]}, plan)
    features = FeatureModel(b.path(layout.DEMO_FEATURES)) if b.has(layout.DEMO_FEATURES) else None
    t0 = time.perf_counter()
    res = evaluate_runners(b.facts, layout.class_embedding(b), runners, open_decoder(b),
                           default_labels(b.facts, None, args.eval), args.seed, cfg, features=features,
                           eps_mse=False)
    print(f"\neval: {args.eval} samples, seed {args.seed}, 20 DDIM steps, η {args.eta:g}, no correction "
          f"({time.perf_counter() - t0:.0f} s)")
    print_rows(res.rows, 40)
    return res.to_json()


if __name__ == "__main__":
    main()
