"""Why NNCF's OpenVINO INT8 graph is faster than ptqd's: where each puts its quantizers, and what ptqd's own
OpenVINO graph gains from each step towards NNCF's layout (issue 21, item 2). A study, not an engine: the
variants below are not validated against a fake-quant model (they compute other numerics than ptqd's
calibrated precisions, e.g. without the conv outputs' requantization).

    python benchmarks/openvino_layouts.py BUNDLE [--precision w4a8] [--runs 10] [--threads 2]
        [--float-precision bf16|f32] [--variants ptqd,ptqd-resq,...] [--max-isa AVX512_CORE_VNNI|AVX2|...]
        [--layers REGEX ...]

Timed in one process, interleaved rounds, median of ``--runs`` after 3 warm-up, batch 1 and 2:

  ptqd-requant    the bundle's calibration in ONNX Runtime's layout (conv outputs requantized), as IR, i4 weights
  ptqd            as ptqd's OpenVINO engine is built (``openvino_layers``: conv outputs left in float; ``--act-grid
                  signed``: every 8-bit input with negative values on a symmetric int8 grid; ``write_qdq(inputs_at=
                  "source")``: a layer's input Q/DQ above the Reshape/Transpose that feed it, a transformer's proj_out)
  ptqd-again      ptqd's graph compiled a second time: the control. Two compiles of one graph differ by a few per
                  cent at small batches (memory placement), so a variant's difference below theirs is noise
  ptqd-at-input   ptqd with every layer's input Q/DQ on the layer's input, after the Reshape/Transpose (before
                  ``inputs_at="source"``: the Transposes move float values)
  ptqd-expand     ptqd with each one-key cross-attention's output projection on every token: v broadcast first,
                  then to_out (before ``attention_graph.one_token_chain``: to_out on the one token, then broadcast)
  ptqd-before     ptqd-expand and ptqd-conv-proj together (ptqd's OpenVINO graph before both rewrites)
  ptqd-conv-proj  ptqd with each transformer's proj_in run as the 1x1 conv, its output then laid out as tokens
                  (before ``token_proj.proj_in_on_tokens``: the layout ops on the conv's int8 input, and a matmul)
  ptqd-projin     ptqd with each transformer's proj_in output requantized on its calibrated 8-bit grid (symmetric),
                  so the Transpose to tokens and the LayerNorm after it read int8 (NNCF's layout there; speed only)
  ptqd-mixed      ptqd built with ``--act-grid mixed`` (symmetric int8 only where the step widens <= 1.25x)
  ptqd-unsigned   ptqd built with ``--act-grid unsigned`` (u8 inputs with the calibrated zero points)
  ptqd-unsplit    ptqd without the GEGLU rewrite (``ptqd.engines.geglu``): the projection cut by a VariadicSplit
  ptqd-zp         ptqd with the weights' all-zero zero points kept as DequantizeLinear inputs (before this was built:
                  ``graph_opt.without_weight_zero_points``)
  ptqd-attn       ptqd plus Q/DQ on attention's q/k/v projections' outputs and softmax outputs, so QKᵀ and AV can
                  run in int8 (speed only: fixed scales, not calibrated, not validated; ptqd does not build it)
  ptqd-resq       ptqd plus Q/DQ on the output of every float Add (the residual stream, the bias and time-embedding
                  adds), where NNCF keeps its tensors in int8 between layers (speed only, like ptqd-attn)
  ptqd-resq-attn  both probes
  nncf-default    NNCF quantize() with its default recipe on the bundle's calibration inputs (8 items)
  nncf-mixed      NNCF quantize(), mixed preset and transformer model type

Then, for NNCF's default graph: every FakeQuantize by (producer op, consumer ops, grid), the census that
says which tensors NNCF keeps in int8 between layers; the executed-graph summary of each variant; and, for
ptqd, ptqd-attn and NNCF's default, the executed layer time by (layer type, precision), where the gap is, and
their heaviest fused subgraphs (e.g. attention cores in bf16 against NNCF's int8 ones).
Every model runs with its float parts in ``--float-precision`` (default bf16: what OpenVINO itself picks on a CPU
with native bf16; f32 on one without). Needs openvino and nncf.
"""

from __future__ import annotations

import argparse
import dataclasses
import collections
import tempfile
from pathlib import Path

import numpy as np


ATTENTION_PROJ = ("/to_q/", "/to_k/", "/to_v/")


def qdq_after(src: Path, dst: Path, choose) -> collections.Counter:
    """``src`` (a QDQ ONNX) with a Q/DQ pair after the first output of every node for which ``choose(node,
    readers)`` gives (kind, scale, u8 zero point) instead of None, written to ``dst``. Returns the count per kind."""
    import onnx
    from onnx import helper, numpy_helper

    from ptqd.engines.onnx_io import read_external, save_model

    m = onnx.load(str(src), load_external_data=False)
    read_external(m, src)
    g = m.graph
    readers: dict = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            readers[i].append(n)
    after, counts = {}, collections.Counter()
    for n in g.node:
        got = choose(n, readers)
        if got is None:
            continue
        kind, scale, zp = got
        t, tag = n.output[0], f"probeq{sum(counts.values())}"
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{tag}_s"),
                              numpy_helper.from_array(np.array(zp, np.uint8), f"{tag}_z")])
        for r in readers[t]:
            r.input[:] = [f"{tag}_dq" if i == t else i for i in r.input]
        after[n.name] = [helper.make_node("QuantizeLinear", [t, f"{tag}_s", f"{tag}_z"], [f"{tag}_q"], name=f"{tag}_Q"),
                         helper.make_node("DequantizeLinear", [f"{tag}_q", f"{tag}_s", f"{tag}_z"], [f"{tag}_dq"],
                                          name=f"{tag}_DQ")]
        counts[kind] += 1
    nodes = [x for n in g.node for x in [n] + after.get(n.name, [])]
    del g.node[:]
    g.node.extend(nodes)
    save_model(m, dst)
    return counts


def with_attention_qdq(src: Path, dst: Path) -> dict:
    """``src`` (a QDQ ONNX) with Q/DQ after every Softmax (u8, scale 1/255) and after the MatMul of every attention
    q/k/v projection (u8, a fixed scale): the layout in which OpenVINO can run QKᵀ and AV in int8."""
    def choose(n, readers):
        if n.op_type == "Softmax":
            return "softmax", 1 / 255, 0
        if n.op_type == "MatMul" and any(a in n.name for a in ATTENTION_PROJ):
            return "qkv", 0.05, 128
        return None

    return dict(qdq_after(src, dst, choose))


def float_adds(m) -> list:
    """The Add nodes of ONNX model ``m`` whose output is a float tensor (not shape arithmetic)."""
    import onnx

    typed = onnx.shape_inference.infer_shapes(m)
    elem = {v.name: v.type.tensor_type.elem_type for v in list(typed.graph.value_info) + list(typed.graph.input)}
    return [n for n in m.graph.node if n.op_type == "Add" and elem.get(n.output[0]) == onnx.TensorProto.FLOAT]


def with_residual_qdq(src: Path, dst: Path) -> int:
    """``src`` (a QDQ ONNX) with Q/DQ (u8, a fixed scale) after every float Add whose output is read by anything but
    a quantizer: the residual stream and the bias adds move between layers in int8, as in NNCF's graph. Speed
    only. Returns how many Adds it quantized."""
    import onnx

    m = onnx.load(str(src), load_external_data=False)
    adds = {n.name for n in float_adds(m)}
    outs = {o.name for o in m.graph.output}
    del m

    def choose(n, readers):
        t = n.output[0] if n.name in adds else None
        if t is None or t in outs or all(r.op_type == "QuantizeLinear" for r in readers[t]):
            return None
        return "add", 0.05, 128

    return sum(qdq_after(src, dst, choose).values())


def executed_ms(compiled, feeds: dict, key, runs: int = 3) -> collections.Counter:
    """Executed layer ms (OpenVINO's per-layer counters, mean of ``runs`` after one warm-up) summed by ``key(p)``
    of each layer's profiling record (None: left out)."""
    req = compiled.create_infer_request()
    req.infer(feeds)
    out: collections.Counter = collections.Counter()
    for _ in range(runs):
        req.infer(feeds)
        for p in req.get_profiling_info():
            k = key(p) if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_EXECUTED") else None
            if k is not None:
                out[k] += p.real_time.total_seconds() * 1e3 / runs
    return out


def time_by_type(compiled, feeds: dict, runs: int = 3) -> collections.Counter:
    """Executed layer ms by "layer type:precision"."""
    from ptqd.engines.openvino import exec_precision

    return executed_ms(compiled, feeds, lambda p: f"{p.node_type}:{exec_precision(str(p.exec_type))}", runs)


def top_subgraphs(compiled, feeds: dict, most: int = 3, runs: int = 3) -> list:
    """OpenVINO's fused subgraphs (``Subgraph``: eltwise chains, and attention cores that it fuses whole) grouped by
    output shape and input -> output element types, heaviest first: [((shape, types), (ms, count, fused layers))].
    Shows, e.g., a float attention core that costs more than the int8 one of another graph."""
    info = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        if op.get_output_size():
            rt = op.get_rt_info()
            fused = rt["originalLayersNames"].astype(str) if "originalLayersNames" in rt else ""
            types = ",".join(sorted({op.input(i).get_element_type().get_type_name()
                                     for i in range(op.get_input_size())}))
            info[op.get_friendly_name()] = (str(op.get_output_partial_shape(0)),
                                            f"{types} -> {op.get_output_element_type(0).get_type_name()}", fused)
    ms = executed_ms(compiled, feeds, lambda p: p.node_name if p.node_type == "Subgraph" else None, runs)
    groups: dict = {}
    for name, t in ms.items():
        shape, types, fused = info.get(name, ("?", "?", ""))
        total, n, _ = groups.get((shape, types), (0.0, 0, ""))
        short = ", ".join(x.rsplit("/", 1)[-1] for x in fused.split(",")[:4])
        groups[(shape, types)] = (total + t, n + 1, short)
    return sorted(groups.items(), key=lambda kv: -kv[1][0])[:most]


def layer_ms(runner, feeds: dict, pattern: str, runs: int = 10) -> tuple[float, int]:
    """(executed ms, how many layers) of the executed layers whose name or fused original layers match ``pattern``
    (a regular expression), on a profiled compile of ``runner``'s model at ``feeds``' shapes."""
    import re

    rx = re.compile(pattern)
    m = runner.model.clone()
    m.reshape({n: list(feeds[n].shape) for n in runner.input_names})
    cm = runner.core.compile_model(m, "CPU", dict(runner.config, PERF_COUNT=True))
    fused = {}
    for op in cm.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        fused[op.get_friendly_name()] = rt["originalLayersNames"].astype(str) if "originalLayersNames" in rt else ""
    ms = executed_ms(cm, feeds, lambda p: p.node_name if rx.search(p.node_name) or rx.search(fused.get(p.node_name, ""))
                     else None, runs)
    return sum(ms.values()), len(ms)


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


VARIANTS = ("ptqd-requant", "ptqd", "ptqd-again", "ptqd-at-input", "ptqd-expand", "ptqd-conv-proj", "ptqd-before", "ptqd-projin", "ptqd-unsplit", "ptqd-zp", "ptqd-mixed", "ptqd-unsigned", "ptqd-attn", "ptqd-resq", "ptqd-resq-attn", "nncf-default",
            "nncf-mixed")


MAX_ISA = ("AVX512_CORE_AMX", "AVX512_CORE_BF16", "AVX512_CORE_VNNI", "AVX2_VNNI", "AVX2")  # oneDNN names, most first


def kernels(runner, feeds: dict) -> collections.Counter:
    """The implementation names of the executed convolutions and matmuls at these inputs (e.g. brgconv_avx512_I8):
    which instruction set the plugin really used."""
    m = runner.model.clone()
    m.reshape({n: list(feeds[n].shape) for n in runner.input_names})
    req = runner.core.compile_model(m, "CPU", dict(runner.config, PERF_COUNT=True)).create_infer_request()
    req.infer({n: feeds[n] for n in runner.input_names})
    return collections.Counter(str(p.exec_type) for p in req.get_profiling_info()
                               if p.node_type in ("Convolution", "FullyConnected", "FullyConnectedQuantizedLegacy"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="w4a8")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--float-precision", choices=("bf16", "f32"), default="bf16",
                    help="float parts of every model (bf16 runs only where this CPU has it natively)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"which graphs to time (of {', '.join(VARIANTS)})")
    ap.add_argument("--layers", action="append", default=[], metavar="REGEX",
                    help="also print, per graph and batch, the executed ms of the layers whose name or fused layers "
                         "match REGEX (OpenVINO's counters, mean of 10; repeatable), e.g. 'attn2/to_out'")
    ap.add_argument("--max-isa", choices=MAX_ISA,
                    help="cap the instruction set of OpenVINO's CPU kernels (oneDNN's ONEDNN_MAX_CPU_ISA): "
                         "AVX512_CORE_BF16 runs this CPU's kernels as on one with AVX-512 VNNI and BF16 and no AMX (an AMD "
                         "EPYC Zen 4), AVX512_CORE_VNNI without BF16 either, AVX2 as on one with AVX2 only. Same cores, caches and clocks: an emulation of the kernel choice only")
    args = ap.parse_args(argv)
    want = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not want or set(want) - set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.max_isa:
        import os
        import sys

        if "openvino" in sys.modules:
            ap.error("--max-isa must be set before openvino is imported: run the script as a program")
        os.environ["ONEDNN_MAX_CPU_ISA"] = args.max_isa
        if MAX_ISA.index(args.max_isa) > MAX_ISA.index("AVX512_CORE_BF16") and args.float_precision == "bf16":
            args.float_precision = "f32"  # no native bf16 below that: ptqd's engines run f32 on such a CPU
            print("--max-isa below AVX512_CORE_BF16: float parts in f32", file=sys.stderr)
    import contextlib
    import sys

    import nncf
    import openvino as ov

    from ptqd.bundle import Bundle, layout
    from ptqd.engines import graph_opt
    from ptqd.engines.geglu import split_geglu
    from ptqd.engines.openvino import OvRunner, convert_qdq, openvino_layers
    from ptqd.engines.qdq import write_qdq
    from ptqd.engines.runner import round_robin
    from ptqd.facts import seeded_unet_inputs
    from ptqd.resources import cpu_description
    from ptqd.stages.build_openvino import ACT_GRIDS
    from ptqd.stages.common import calib_layers

    b = Bundle.open(args.bundle)
    graph_opt.prepare(b.path(layout.UNET_ONNX))
    layers = calib_layers(b, args.precision, 0, len(layout.calib_buckets(b)))
    fp = b.path(layout.UNET_ONNX)
    as_built = lambda m: graph_opt.optimize_for_openvino(m, fp)  # noqa: E731 (the graph rewrites of ptqd's build)
    signed = ACT_GRIDS["signed"]
    at_input = {"ptqd-requant", "ptqd-at-input"}  # the variants whose input Q/DQ stay on the layers' inputs
    from ptqd.engines.openvino import signed_grid

    made = {lq.name: lq.act_out for lq in layers}  # the calibration's output grids (ONNX Runtime's requantization)
    projin = [dataclasses.replace(lq, act_out=signed_grid(made[lq.name], signed))
              if lq.module.endswith("proj_in") and made[lq.name] is not None else lq
              for lq in openvino_layers(layers, signed)]
    variants = {"ptqd-requant": (layers, as_built), "ptqd": (openvino_layers(layers, signed), as_built),
                "ptqd-again": (openvino_layers(layers, signed), as_built),
                "ptqd-projin": (projin, as_built),
                "ptqd-conv-proj": (openvino_layers(layers, signed),
                                   lambda m: graph_opt.optimize_for_openvino(m, fp, proj_in_tokens=False)),
                "ptqd-expand": (openvino_layers(layers, signed),
                                lambda m: graph_opt.optimize_for_openvino(m, fp, one_token="none")),
                "ptqd-before": (openvino_layers(layers, signed), lambda m: graph_opt.optimize_for_openvino(
                    m, fp, proj_in_tokens=False, one_token="none")),
                "ptqd-at-input": (openvino_layers(layers, signed), as_built),
                "ptqd-mixed": (openvino_layers(layers, ACT_GRIDS["mixed"]), as_built),
                "ptqd-unsigned": (openvino_layers(layers), as_built),
                "ptqd-unsplit": (openvino_layers(layers, signed), lambda m: (
                    graph_opt.fuse_attention(m, graph_opt.evaluated(fp)[1], one_key_only=True),
                    graph_opt.without_weight_zero_points(m))),
                "ptqd-zp": (openvino_layers(layers, signed), lambda m: (
                    graph_opt.fuse_attention(m, graph_opt.evaluated(fp)[1], one_key_only=True),
                    split_geglu(m, graph_opt.evaluated(fp)[0])))}
    runners = {}
    fpp = args.float_precision
    with tempfile.TemporaryDirectory(prefix="ptqd-ovl-") as tmp:
        for name, (ls, rewrite) in variants.items():
            if name != "ptqd" and name not in want or name == "ptqd" and not {"ptqd", "ptqd-attn", "ptqd-resq",
                                                                              "ptqd-resq-attn"} & set(want):
                continue
            qdq = Path(tmp) / f"{name}.qdq.onnx"
            write_qdq(fp, ls, qdq, rewrite=rewrite, signed=True, inputs_at="input" if name in at_input else "source")
            convert_qdq(qdq, Path(tmp) / f"{name}.xml.gz")
            if name in want:  # read whole: the folder goes away
                runners[name] = OvRunner(Path(tmp) / f"{name}.xml.gz", args.threads, float_precision=fpp)
            if name != "ptqd":
                continue
            probes = {"ptqd-attn": (with_attention_qdq,), "ptqd-resq": (with_residual_qdq,),
                      "ptqd-resq-attn": (with_residual_qdq, with_attention_qdq)}
            for probe, steps in probes.items():
                if probe not in want:
                    continue
                src = qdq
                for i, step in enumerate(steps):
                    dst = Path(tmp) / f"{probe}{i}.qdq.onnx"
                    print(f"{probe}: {step.__name__} added Q/DQ after {step(src, dst)}", file=sys.stderr)
                    src = dst
                convert_qdq(src, Path(tmp) / f"{probe}.xml.gz")
                runners[probe] = OvRunner(Path(tmp) / f"{probe}.xml.gz", args.threads, float_precision=fpp)
        fp_model = ov.Core().read_model(str(b.path(layout.UNET_ONNX)))
        data = np.load(b.path(layout.CALIB_FEEDS))
        names = [i.get_any_name() for i in fp_model.inputs]
        idx = np.linspace(0, len(data["t"]) - 1, 8).round().astype(int)
        items = [{n: data[n][i:i + 1] for n in names} for i in idx]
        with contextlib.redirect_stdout(sys.stderr):
            default = nncf.quantize(fp_model, nncf.Dataset(items), subset_size=len(items))
            mixed = nncf.quantize(fp_model, nncf.Dataset(items), subset_size=len(items), preset=nncf.QuantizationPreset.MIXED,
                                  model_type=nncf.ModelType.TRANSFORMER)
        runners["nncf-default"] = OvRunner("nncf-default", args.threads, model=default, float_precision=fpp)
        runners["nncf-mixed"] = OvRunner("nncf-mixed", args.threads, model=mixed, float_precision=fpp)
        print(f"{b.root.name}, {args.precision}, float parts {runners['nncf-default'].float_precision}; {cpu_description()}; OpenVINO {ov.__version__}, NNCF {nncf.__version__}; "
              f"{args.threads} threads, interleaved rounds, median of {args.runs} after 3 warm-up")
        f1 = seeded_unet_inputs(b.facts, 1, 501.0, 0)
        isa = args.max_isa or "none (this CPU's best)"
        print(f"kernel ISA cap: {isa}; NNCF default's conv/matmul kernels: "
              + ", ".join(f"{k} {n}" for k, n in kernels(runners["nncf-default"], f1).most_common(4)))
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
        for k in [v for v in VARIANTS if v in runners and v != "nncf-mixed"]:
            r = runners[k]
            s = r.executed_summary({n: f[n] for n in r.input_names}, runs=3)
            shares = ", ".join(f"{a} {v:.0%}" for a, v in s["time_share"].items())
            print(f"  {k:16s} {s['compute_layers']}  reorders {s['reorders']}  {s['layer_ms']:.1f} ms  ({shares})")
        cols = [v for v in ("ptqd", "ptqd-unsplit", "ptqd-attn", "ptqd-resq", "ptqd-resq-attn", "nncf-default")
                if v in runners]
        by_type, heavy = {}, {}
        for k in cols:
            r = runners[k]
            m = r.model.clone()
            m.reshape({n: list(f[n].shape) for n in r.input_names})
            cm = r.core.compile_model(m, "CPU", dict(r.config, PERF_COUNT=True))
            by_type[k] = time_by_type(cm, {n: f[n] for n in r.input_names})
            heavy[k] = top_subgraphs(cm, {n: f[n] for n in r.input_names})
        print("\nexecuted layer ms at batch 1 by layer type and precision (Subgraph: OpenVINO's fused eltwise chains)")
        print(f"  {'layer:precision':32s}" + "".join(f"{k:>14s}" for k in cols))
        kinds = sorted({t for c in by_type.values() for t in c}, key=lambda t: -max(c[t] for c in by_type.values()))
        for t in kinds:
            if max(c[t] for c in by_type.values()) >= 0.5:
                print(f"  {t:32s}" + "".join(f"{by_type[k][t]:14.2f}" for k in cols))
        print(f"  {'total':32s}" + "".join(f"{sum(by_type[k].values()):14.2f}" for k in cols))
        print("\nthe heaviest fused subgraphs at batch 1, by output shape and input/output types (ms, count, "
              "e.g. the layers fused)")
        for k, rows in heavy.items():
            for (shape, types), (ms, n, fused) in rows:
                print(f"  {k:14s} {ms:7.2f} ms  {n:3d} x {shape} {types}  e.g. {fused}")
        for pattern in args.layers:
            print(f"\nexecuted ms of the layers matching {pattern!r} (name or fused layers; OpenVINO's counters, mean "
                  "of 10): batch 1, batch 2, layers")
            for k, r in runners.items():
                row = []
                for batch in (1, 2):
                    fb = seeded_unet_inputs(b.facts, batch, 501.0, 0)
                    ms, n = layer_ms(r, {x: fb[x] for x in r.input_names}, pattern)
                    row.append(f"{ms:9.3f}")
                print(f"  {k:16s} {' '.join(row)}  {n}")
        print("\nNNCF default: activation FakeQuantize by producer -> consumers (grid, levels)")
        for (prod, cons, grid, levels), n in fq_census(default):
            print(f"  {n:4d}  {prod} -> {', '.join(cons)}  ({grid}, {levels})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
