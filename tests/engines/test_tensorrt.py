"""TensorRT backend on the CPU: the TensorRT QDQ graphs, the conformance linter, the build
configuration and profile shapes. Tests that need TensorRT and a GPU are marked ``tensorrt`` and
skip (``pytest.importorskip`` inside the test) where it is absent; nothing here imports tensorrt at
collection time.

One calibrated demo bundle per module (tiny calibration: these tests check graph structure and
numerics of the writer, not calibration quality).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.calib.calibrate import PRECISIONS, load_params
from ptqd.engines.tensorrt.lint import RULES, Finding, format_findings, lint_bundle, lint_qdq
from ptqd.engines.tensorrt import (
    INSTALL_HINT,
    TrtOptions,
    build_spec,
    create_config,
    graph_inputs,
    int4_block_size,
    numerics_summary,
    profile_shapes,
    summarize_layers,
    symmetric_act_scale,
    write_qdq_tensorrt,
)
from ptqd.errors import MissingDependencyError, UserError

GRAPHS = ("fp16",) + tuple(PRECISIONS)  # fp16: the unquantized baseline engine's graph


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("trt") / "demo.bundle"
    api.export("demo", d, progress=False, validate=False)
    api.calibrate(d, samples=2, steps=2, rounding="nearest", progress=False)
    return d


def _layers(b: Bundle, precision: str):
    """The calibrated layers the TensorRT graph takes (embedding Gemms stay fp32 there, as in tensorrt_backend)."""
    layers = load_params(b.read_json(f"calib/{precision}.json"), np.load(b.path(f"calib/{precision}.npz")))
    return [lq for lq in layers if lq.op in ("Conv", "MatMul")]


@pytest.fixture(scope="module")
def graphs(demo, tmp_path_factory):
    """{name: (path, writer record)} for the fp16 baseline and every calibrated precision, plus the
    ONNX Runtime w8a8 graph (``ort-w8a8``) for contrast."""
    from ptqd.engines.qdq import write_qdq

    out = tmp_path_factory.mktemp("trtgraphs")
    b = Bundle.open(demo)
    res = {}
    for p in GRAPHS:
        path = out / f"{p}.qdq.onnx"
        res[p] = (path, write_qdq_tensorrt(b.path(api.UNET_ONNX), [] if p == "fp16" else _layers(b, p), path))
    write_qdq(b.path(api.UNET_ONNX), _layers(b, "w8a8"), out / "ort-w8a8.qdq.onnx")
    res["ort-w8a8"] = (out / "ort-w8a8.qdq.onnx", None)
    return res


def _rules(findings: list[Finding]) -> set[str]:
    return {f.rule for f in findings}


# ---- the linter on good and bad graphs ----------------------------------------------------------
@pytest.mark.parametrize("precision", GRAPHS)
def test_linter_passes_on_every_demo_precision(graphs, precision):
    path, rec = graphs[precision]
    assert lint_qdq(path) == []
    if precision != "fp16":
        assert rec["quantized_nodes"] > 0


def test_linter_fails_on_the_onnxruntime_graph(graphs):
    """Asymmetric uint8 activations, int32 bias DQs and Q/DQ on conv outputs: not TensorRT's graph."""
    found = lint_qdq(graphs["ort-w8a8"][0])
    assert {"zero-point", "quant-type", "placement"} <= _rules(found)
    zp = next(f for f in found if f.rule == "zero-point")
    assert "QuantizeLinear" in zp.node and "symmetric" in zp.message


# Each breaker takes the w8a8 (or w4a8) TensorRT graph and breaks exactly one rule.
def _init(m, suffix: str):
    return next(i for i in m.graph.initializer if i.name.endswith(suffix))


def _set(m, name: str, arr) -> None:
    t = next(i for i in m.graph.initializer if i.name == name)
    t.CopyFrom(numpy_helper.from_array(np.asarray(arr), name))


def _node(m, suffix: str):
    return next(n for n in m.graph.node if n.name.endswith(suffix))


def _break_opset(m):
    m.opset_import[0].version = 17  # FP16 Q/DQ scales need 19


def _break_quant_type(m):
    zp = _init(m, "middle_block_0_in_layers_in_layers_2_Conv_x_zp")
    _set(m, zp.name, np.array(0, np.uint8))  # still zero, but uint8: asymmetric type


def _break_zero_point(m):
    zp = _init(m, "middle_block_0_in_layers_in_layers_2_Conv_x_zp")
    _set(m, zp.name, np.array(3, np.int8))


def _break_scale(m):
    s = _init(m, "middle_block_0_in_layers_in_layers_2_Conv_w_scale")
    arr = numpy_helper.to_array(s).copy()
    arr[0] = -arr[0]
    _set(m, s.name, arr)


def _break_scale_shape(m):
    s = _init(m, "middle_block_0_in_layers_in_layers_2_Conv_x_scale")
    _set(m, s.name, np.repeat(numpy_helper.to_array(s)[None], 2))  # per-axis activation scale


def _break_weight_axis(m):
    dq = _node(m, "attn1_to_q_MatMul_DequantizeLinear_w")  # weight [64, 64]: axis 0 fits the shape
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 0


def _break_int4(m):
    w = _init(m, "middle_block_0_in_layers_in_layers_2_Conv_w_int8")  # a 4-bit-grid conv weight
    vals = numpy_helper.to_array(w)
    w.CopyFrom(helper.make_tensor(w.name, TensorProto.INT4, vals.shape, vals.ravel().tolist()))


def _break_placement(m):
    sig = next(n for n in m.graph.node if n.op_type == "Sigmoid" and "in_layers" in n.name)
    x = sig.input[0]
    dt = TensorProto.FLOAT16
    m.graph.initializer.extend([helper.make_tensor("bad_s", dt, [], [0.05]), helper.make_tensor("bad_z", TensorProto.INT8,
                                                                                                 [], [0])])
    q = helper.make_node("QuantizeLinear", [x, "bad_s", "bad_z"], ["bad_q"], name="bad_Q")
    dq = helper.make_node("DequantizeLinear", ["bad_q", "bad_s", "bad_z"], ["bad_dq"], name="bad_DQ")
    sig.input[0] = "bad_dq"
    nodes = list(m.graph.node)
    i = nodes.index(sig)
    del m.graph.node[:]
    m.graph.node.extend(nodes[:i] + [q, dq] + nodes[i:])


def _break_output(m):
    last = next(n for n in m.graph.node if "eps" in n.output)
    last.output[0] = "eps_raw"
    m.graph.initializer.extend([numpy_helper.from_array(np.array(0.01, np.float32), "out_s"),
                                numpy_helper.from_array(np.array(0, np.int8), "out_z")])
    m.graph.node.extend([helper.make_node("QuantizeLinear", ["eps_raw", "out_s", "out_z"], ["eps_q"], name="out_Q"),
                         helper.make_node("DequantizeLinear", ["eps_q", "out_s", "out_z"], ["eps"], name="out_DQ")])


BREAKERS = {
    "opset": ("w8a8", _break_opset),
    "quant-type": ("w8a8", _break_quant_type),
    "zero-point": ("w8a8", _break_zero_point),
    "scale": ("w8a8", _break_scale),
    "scale-shape": ("w8a8", _break_scale_shape),
    "weight-axis": ("w8a8", _break_weight_axis),
    "int4": ("w4a8", _break_int4),
    "placement": ("w8a8", _break_placement),
    "output": ("w8a8", _break_output),
}


def test_every_rule_has_a_breaker():
    assert set(BREAKERS) == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_broken_graph_fails_naming_the_rule(graphs, rule):
    precision, breaker = BREAKERS[rule]
    model = onnx.load(str(graphs[precision][0]))
    assert lint_qdq(model) == []
    broken = copy.deepcopy(model)
    breaker(broken)
    found = lint_qdq(broken)
    assert _rules(found) == {rule}, [str(f) for f in found]
    assert all(f.node and f.message for f in found)


def test_int4_weights_with_a_quantized_activation_are_flagged(graphs):
    """TensorRT's INT4 is weight-only: an int8 Q/DQ on the same MatMul's activation is not fused."""
    model = onnx.load(str(graphs["w4a8"][0]))
    mm = next(n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith("_wd")
              and "attn1/to_q" in n.name)
    x = mm.input[0]
    model.graph.initializer.extend([helper.make_tensor("q_s", TensorProto.FLOAT16, [], [0.05]),
                                    helper.make_tensor("q_z", TensorProto.INT8, [], [0])])
    nodes = list(model.graph.node)
    i = nodes.index(mm)
    mm.input[0] = "q_dq"
    del model.graph.node[:]
    model.graph.node.extend(nodes[:i] + [helper.make_node("QuantizeLinear", [x, "q_s", "q_z"], ["q_q"], name="q_Q"),
                                         helper.make_node("DequantizeLinear", ["q_q", "q_s", "q_z"], ["q_dq"],
                                                          name="q_DQ")] + nodes[i:])
    found = lint_qdq(model)
    assert _rules(found) == {"int4"} and "weight-only" in found[0].message


def test_lint_rejects_unknown_target(graphs):
    with pytest.raises(UserError, match="--target"):
        lint_qdq(graphs["w8a8"][0], target="coreml")


def test_lint_bundle(demo, graphs, tmp_path):
    """lint_bundle reads engines/tensorrt/*.qdq.onnx through the bundle (checksums verified)."""
    d = tmp_path / "copy.bundle"
    shutil.copytree(demo, d)
    with pytest.raises(UserError, match="no tensorrt QDQ graphs"):
        lint_bundle(d)
    with Bundle.transaction(d) as w:
        for p in PRECISIONS:
            shutil.copyfile(graphs[p][0], w.file(f"engines/tensorrt/{p}.qdq.onnx"))
        shutil.copyfile(graphs["ort-w8a8"][0], w.file("engines/tensorrt/asym.qdq.onnx"))
    res = lint_bundle(d)
    assert set(res) == set(PRECISIONS) | {"asym"}
    assert all(res[p] == [] for p in PRECISIONS) and res["asym"]
    report = format_findings(res, limit=3)
    assert "w8a8        ok" in report and "  zero-point: " in report
    n = len(res["asym"])
    assert f"asym        {n} finding(s): " in report and f"  ... and {n - 3} more" in report
    assert len(format_findings(res, limit=None).splitlines()) == len(PRECISIONS) + 1 + n


# ---- the TensorRT graph: what it computes -------------------------------------------------------
def test_activation_quantizer_is_symmetric_and_recorded(demo, graphs):
    path, rec = graphs["w8a8"]
    assert "symmetric" in rec["activation_quantizer"] and "asymmetric" in rec["activation_quantizer"]
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    lq = _layers(Bundle.open(demo), "w8a8")[5]
    from ptqd.engines.qdq import node_key

    lo, hi = lq.act_in.range
    assert lq.act_in.zero_point != 0  # the calibrated quantizer is asymmetric...
    base = node_key(lq.name)
    assert inits[f"{base}_x_zp"] == 0 and inits[f"{base}_x_zp"].dtype == np.int8  # ...the TensorRT one is not
    assert inits[f"{base}_x_scale"] == np.float16(max(-lo, hi) / 127)
    # weights: the calibrated integers and scales, unchanged
    w = inits[f"{base}_w_int8"]
    np.testing.assert_array_equal(w, lq.w_int if lq.op == "Conv" else lq.w_int.T)
    np.testing.assert_array_equal(inits[f"{base}_w_scale"], lq.w_scale.astype(np.float16))
    # no requantized conv outputs, no int32 bias
    assert not any(n.name.endswith(("_QuantizeLinear_y", "_DequantizeLinear_b")) for n in model.graph.node)


def test_four_bit_activations_clip_to_seven_steps(graphs):
    model = onnx.load(str(graphs["w4a4"][0]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    assert clips
    for c in clips:
        base = c.name[: -len("_Clip")]
        s = inits[f"{base}_x_scale"].astype(np.float32)
        assert np.isclose(inits[c.input[2]].astype(np.float32), 7 * s, rtol=1e-3)
        assert inits[c.input[1]] == -inits[c.input[2]]


def test_int4_matmul_weights_are_the_calibrated_ones(demo, graphs):
    """w4*: 4-bit MatMul weights packed as INT4 with 2-D block scales along K; values exact."""
    path, rec = graphs["w4a8"]
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    from ptqd.engines.qdq import node_key

    layers = [lq for lq in _layers(Bundle.open(demo), "w4a8") if lq.op == "MatMul" and lq.w_bits == 4]
    assert layers and rec["int4_weight_only_layers"] == len(layers)
    assert "not quantized" in rec["int4"]
    for lq in layers:
        base = node_key(lq.name)
        w = inits[f"{base}_w_int4"]
        assert w.data_type == TensorProto.INT4
        np.testing.assert_array_equal(numpy_helper.to_array(w).astype(np.int8), lq.w_int.T)
        k, n = lq.w_int.T.shape
        bs = int4_block_size(k, n)
        scales = numpy_helper.to_array(inits[f"{base}_w_scale"])
        assert scales.shape == (k // bs, n) and np.all(scales == lq.w_scale.astype(np.float16)[None])
        dq = next(x for x in model.graph.node if x.name == f"{base}_DequantizeLinear_w")
        assert helper.get_attribute_value(next(a for a in dq.attribute if a.name == "block_size")) == bs
        assert f"{base}_QuantizeLinear_x" not in {x.name for x in model.graph.node}  # weight-only
    assert model.opset_import[0].version == 21
    # convs keep 4-bit numerics on the int8 grid
    assert any(k.startswith("Conv: int8 per channel (4-bit grid)") for k in rec["layers"])


def test_fp16_graph_keeps_io_and_time_embedding_fp32(graphs):
    path, rec = graphs["fp16"]
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)
             + list(model.graph.output)}
    assert all(types[i.name] == TensorProto.FLOAT for i in model.graph.input)
    assert types["eps"] == TensorProto.FLOAT
    by_op = {}
    for n in model.graph.node:
        by_op.setdefault(n.op_type, []).append(n)
    assert all(types[n.input[0]] == TensorProto.FLOAT for n in by_op["Sin"] + by_op["Cos"])  # timestep path
    assert all(types[n.input[0]] == TensorProto.FLOAT16 for n in by_op["Conv"])
    assert rec["fp32_path"]["nodes"] > 0 and rec["opset"] == {"source": 18, "graph": 21,
                                                                "converted_by": "onnx.version_converter"}


def test_trt_graphs_compute_the_model_in_onnxruntime(demo, graphs):
    """The TensorRT graphs are ONNX: ONNX Runtime (CPU) runs them. The FP16 graph matches FP32 to
    fp16 noise; the quantized ones stay close to FP32 (a sanity bound, not a quality claim)."""
    from ptqd.engines.onnxruntime import ort_session

    b = Bundle.open(demo)
    rng = np.random.RandomState(0)
    emb = np.load(b.path(api.CLASS_EMBEDDING))
    feeds = {"x": rng.standard_normal((4, 3, 8, 8)).astype(np.float32),
             "t": np.array([1, 251, 751, 999], np.float32),
             "context": emb[np.arange(4)][:, None, :].astype(np.float32)}
    ref = ort_session(b.path(api.UNET_ONNX)).run(["eps"], feeds)[0]

    def rel(p):
        got = ort_session(graphs[p][0]).run(["eps"], feeds)[0]
        assert got.dtype == np.float32 and got.shape == ref.shape
        return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))

    assert rel("fp16") < 2e-3
    assert rel("w8a8") < 0.1


def test_writer_refuses_a_calibration_of_another_model(demo, tmp_path):
    lq = _layers(Bundle.open(demo), "w8a8")[0]
    lq.name = "/unet/not_there/Conv"
    with pytest.raises(UserError, match="re-run calibrate"):
        write_qdq_tensorrt(Bundle.open(demo).path(api.UNET_ONNX), [lq], tmp_path / "x.onnx")


def test_quantizer_math():
    s, q = symmetric_act_scale(-0.28, 2.54, 8)
    assert q == 127 and s == pytest.approx(2.54 / 127)
    s, q = symmetric_act_scale(-3.0, 1.0, 4)
    assert q == 7 and s == pytest.approx(3.0 / 7)
    assert int4_block_size(256, 64) == 128 and int4_block_size(64, 512) == 64
    assert int4_block_size(96, 64) is None and int4_block_size(128, 63) is None


def test_numerics_summary(graphs):
    assert numerics_summary(graphs["fp16"][1]).startswith("float16")
    s = numerics_summary(graphs["w4a4"][1])
    assert "symmetric int8" in s and "int4 blocks" in s and "±7" in s


# ---- build configuration (no TensorRT needed) ---------------------------------------------------
def test_profile_shapes_double_the_batch_for_guidance(graphs):
    inputs = graph_inputs(graphs["w8a8"][0])
    assert inputs == {"x": (None, 3, 8, 8), "t": (None,), "context": (None, 1, 64)}
    shapes = profile_shapes(inputs, TrtOptions(min_batch=1, opt_batch=4, max_batch=16, cfg=True))
    assert shapes["x"] == {"min": [1, 3, 8, 8], "opt": [8, 3, 8, 8], "max": [32, 3, 8, 8]}
    assert shapes["t"] == {"min": [1], "opt": [8], "max": [32]}
    assert shapes["context"]["max"] == [32, 1, 64]
    plain = profile_shapes(inputs, TrtOptions(opt_batch=4, max_batch=16, cfg=False))
    assert plain["x"]["opt"] == [4, 3, 8, 8] and plain["x"]["max"] == [16, 3, 8, 8]
    with pytest.raises(UserError, match="static latent size"):
        profile_shapes({"x": (None, 3, None, 8)}, TrtOptions())


def test_build_config_is_strongly_typed_without_precision_flags(graphs, tmp_path):
    import sys as _sys

    cache = tmp_path / "timing.cache"
    spec = build_spec(TrtOptions(builder_optimization_level=4), profile_shapes(graph_inputs(graphs["w8a8"][0]),
                                                                             TrtOptions()), cache)
    assert spec["strongly_typed"] is True and spec["precision_flags"] == []
    assert spec["timing_cache"] == str(cache) and spec["profiling_verbosity"] == "DETAILED"
    json.dumps(spec)  # recorded in build.json as is
    config = create_config(spec)  # polygraphy's loader, built without TensorRT
    assert "tensorrt" not in _sys.modules
    assert not (config.fp16 or config.int8 or config.tf32 or config.bf16 or config.fp8)
    assert config.timing_cache_path == str(cache) and config.builder_optimization_level == 4
    (prof,) = config.profiles
    assert tuple(prof["x"].min) == (1, 3, 8, 8) and tuple(prof["x"].opt) == (8, 3, 8, 8)
    assert tuple(prof["x"].max) == (32, 3, 8, 8) and tuple(prof["t"].max) == (32,)


@pytest.mark.parametrize("kwargs", [{"min_batch": 0}, {"opt_batch": 20, "max_batch": 16}, {"float_dtype": "bf16"},
                                    {"builder_optimization_level": 9}, {"workspace_bytes": 0}])
def test_options_validate(kwargs):
    with pytest.raises(UserError):
        TrtOptions(**kwargs).validate()


def test_layer_precisions_from_the_engine_inspector():
    info = {"Layers": [
        {"Name": "conv1", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Thirty-two wide channel vectorized row major Int8 format"}]},
        {"Name": "gemm", "LayerType": "CaskGemmMatrixMultiply",
         "Inputs": [{"Name": "a", "Format/Datatype": "Row major linear FP16 format"},
                    {"Name": "w", "Format/Datatype": "Row major linear Int4 format"}]},
        {"Name": "norm", "LayerType": "Normalization",
         "Inputs": [{"Name": "h", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"},
                    {"Name": "shape", "Format/Datatype": "Row major linear Int64"}]},
        {"Name": "temb", "LayerType": "PointWiseV2", "Inputs": [{"Name": "t", "Format/Datatype": "Row major linear FP32"}]},
        "reformat_only_name",
    ]}
    s = summarize_layers(info)
    assert s["layer_precisions"] == {"int8": 1, "int4": 1, "fp16": 1, "fp32": 1, "unknown": 1}
    assert [r["precision"] for r in s["per_layer"]] == ["int8", "int4", "fp16", "fp32", "unknown"]


# ---- heavy imports stay lazy; missing TensorRT is one clear line --------------------------------
def test_backend_modules_import_light():
    code = ("import sys, ptqd.engines.tensorrt, ptqd.engines.tensorrt.lint; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert not mods & {"tensorrt", "polygraphy", "onnxruntime", "torch", "onnx", "cuda"}, mods


def test_without_tensorrt_each_entry_point_says_what_to_install(graphs, tmp_path):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from ptqd.engines.tensorrt import TrtEngineSet, build_engine, describe_engine, require_tensorrt

    calls = [require_tensorrt, lambda: TrtEngineSet({"w8a8": tmp_path / "w8a8.plan"}),
             lambda: build_engine(graphs["w8a8"][0], tmp_path / "w8a8.plan", {}),
             lambda: describe_engine(tmp_path / "w8a8.plan")]
    for call in calls:
        with pytest.raises(MissingDependencyError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "pip install tensorrt polygraphy" in msg and INSTALL_HINT in msg
    assert not (tmp_path / "w8a8.plan").exists()


def test_cli_build_without_tensorrt_exits_1_with_one_line(demo, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from ptqd.cli import main

    assert main(["build", str(demo), "--backend", "tensorrt"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "tensorrt" in err


# ---- GPU: build, run, share memory (skip without TensorRT) --------------------------------------
@pytest.mark.tensorrt
def test_engines_build_run_and_share_device_memory(demo, graphs, tmp_path):
    pytest.importorskip("tensorrt")
    from ptqd.engines.tensorrt import TrtEngineSet, build_engine
    from ptqd.engines.onnxruntime import ort_session

    opts = TrtOptions(opt_batch=2, max_batch=2)  # profile max 4: a batch of 6 runs in two chunks
    spec = build_spec(opts, profile_shapes(graph_inputs(graphs["w8a8"][0]), opts), tmp_path / "timing.cache")
    plans, descs = {}, {}
    for p in ("fp16", "w8a8", "w4a8"):
        plans[p] = tmp_path / f"{p}.plan"
        descs[p] = build_engine(graphs[p][0], plans[p], spec)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert descs["w8a8"]["layer_precisions"].get("int8", 0) > 0
    b = Bundle.open(demo)
    rng = np.random.RandomState(1)
    emb = np.load(b.path(api.CLASS_EMBEDDING))
    x = rng.standard_normal((6, 3, 8, 8)).astype(np.float32)
    t = np.linspace(1, 999, 6).astype(np.float32)
    ctx = emb[np.arange(6) % len(emb)][:, None, :].astype(np.float32)
    for graphs_on in (False, True):
        with TrtEngineSet(plans, cuda_graphs=graphs_on) as engines:
            assert engines.device_memory_bytes == max(d["device_memory_bytes"] for d in descs.values())
            for p in plans:
                got = engines.runner(p)(x, t, ctx)
                ref = ort_session(graphs[p][0]).run(["eps"], {"x": x, "t": t, "context": ctx})[0]
                rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
                assert got.shape == (6, 3, 8, 8) and rel < 5e-2, (p, graphs_on, rel)
