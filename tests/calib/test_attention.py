"""Quantized attention matmuls (``--attention``): the torch hook sees the graph's attention matmuls in the graph's
order, the engines compute what the fake-quant model does, and the quantization really happens."""

import numpy as np
import onnx
import pytest

from ptqd import api
from ptqd.bundle import Bundle, layout
from ptqd.calib import attention as att
from ptqd.errors import UserError


def _attention_seen(bundle, batch=2):
    """The attention matmuls one FP forward runs (input shapes past axis 0) and their graph rows."""
    from ptqd.models.attention import hooked
    from ptqd.stages.common import load_source

    import torch

    b = Bundle.open(bundle)
    rows = b.read_json(layout.UNET_LAYERS)["layers"]
    loaded = load_source(b)
    x = torch.randn(batch, *b.facts.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((batch,), 500.0)
    c = loaded.context_for(np.zeros(batch, int))
    seen, stats = [], {}
    from ptqd.calib.observe import TensorStats

    obs = att.Observer(stats, 0, np.random.RandomState(0), 16, set(range(1000)), seen, TensorStats)
    with hooked(obs):
        loaded.unet(x, t, c)
    obs.close()
    return seen, rows, stats


@pytest.mark.parametrize("fixture", ["tiny_cin_bundle", "tiny_diffusers_cond_bundle", "tiny_diffusers_uncond_bundle"])
def test_the_hook_sees_every_attention_matmul_of_the_graph_in_its_order(fixture, request):
    seen, rows, stats = _attention_seen(request.getfixturevalue(fixture))
    n = len(att.attention_rows(rows))
    assert n > 0 and len(seen) == 1 and len(seen[0]) == n
    att.check_order(seen, rows)  # shapes too
    assert len(stats) == 2 * n
    with pytest.raises(UserError, match="--attention float"):
        att.check_order([seen[0][:-1]], rows)
    with pytest.raises(UserError, match="attention matmul 0 read"):
        att.check_order([[(7, 7)] + seen[0][1:]], rows)


@pytest.fixture(scope="session")
def tiny_diffusers_cond_bundle(tiny_diffusers_cond, tmp_path_factory):
    out = tmp_path_factory.mktemp("dca") / "d.bundle"
    api.export(tiny_diffusers_cond, out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_diffusers_uncond_bundle(tiny_diffusers_uncond, tmp_path_factory):
    out = tmp_path_factory.mktemp("dua") / "d.bundle"
    api.export(tiny_diffusers_uncond, out, progress=False)
    return out


def test_qk_mode_leaves_the_softmax_side_float(tiny_cin_bundle):
    b = Bundle.open(tiny_cin_bundle)
    rows = b.read_json(layout.UNET_LAYERS)["layers"]
    onnx_path = b.path(layout.UNET_ONNX)
    all_mm = att.selected_matmuls(rows, "int8", onnx_path)
    qk = att.selected_matmuls(rows, "qk", onnx_path)
    assert att.selected_matmuls(rows, "float", onnx_path) == []
    assert len(qk) * 2 == len(all_mm) and {r["index"] for r in qk} == set(range(0, len(all_mm), 2))
    with pytest.raises(UserError, match="--attention must be one of"):
        att.selected_matmuls(rows, "int4", onnx_path)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _eps(runner, feeds, n=4):
    c = feeds.get("context")
    return runner(feeds["x"][:n], feeds["t"][:n], None if c is None else c[:n])


@pytest.mark.parametrize("fixture", ["tiny_cin_bundle", "tiny_diffusers_cond_bundle"])
def test_int8_attention_engines_compute_the_fake_quant_model(fixture, request, tmp_path):
    """CompVis (ptqd's bmm) and diffusers (scaled_dot_product_attention) attention: the ONNX Runtime engine runs
    every attention matmul on MatMulIntegerToFloat and matches the fake-quant model with quantized attention,
    which differs from the one without (so the hook really quantizes)."""
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.torch_ref import TorchRunner
    from ptqd.stages.common import calib_attention, calib_layers, load_source

    d = _copy(request.getfixturevalue(fixture), tmp_path / "b.bundle")
    rec = api.calibrate(d, samples=2, steps=3, rounding="nearest", progress=False, attention="int8")
    b = Bundle.open(d)
    n = len(att.attention_rows(b.read_json(layout.UNET_LAYERS)["layers"]))
    assert rec["attention_matmuls"] == n and rec["config"]["attention"] == "int8"
    quants = calib_attention(b, "w8a8")
    assert len(quants) == n and all(q.a.bits == 8 and q.b.bits == 8 for q in quants)
    assert calib_attention(b, "w4a4")[0] == quants[0]  # 8-bit attention in every precision
    built = api.build(d, precisions=["w8a8"], progress=False)["w8a8"]
    v = built["buckets"][0]["validation_vs_fake_quant"] if "buckets" in built else built["validation_vs_fake_quant"]
    assert v["passed"], v
    assert f"{n} attention matmuls on 8-bit inputs" in built["numerics"]
    b = Bundle.open(d)
    eng_path = b.path(built["buckets"][0]["engine"]) if "buckets" in built else b.path(built["engine"])
    ops = [nd.op_type for nd in onnx.load(str(eng_path), load_external_data=False).graph.node]
    assert "MultiHeadAttention" not in ops
    layers = calib_layers(b, "w8a8")
    linear = sum(lq.op in ("MatMul", "Gemm") for lq in layers)
    # every attention matmul on an integer kernel: MatMulIntegerToFloat, or QLinearMatMul where ONNX Runtime moved
    # the next layer's input quantizer onto P·V's output; each checked by the kernel check
    integer_mm = ops.count("MatMulIntegerToFloat") + ops.count("QLinearMatMul")
    assert integer_mm == n + linear and ops.count("MatMul") == 0
    assert v["kernels"]["passed"] and v["kernels"]["kernels"] == integer_mm + ops.count("QLinearConv")
    loaded = load_source(b)
    feeds = dict(np.load(b.path(layout.CALIB_FEEDS)))
    eng = _eps(OrtRunner(eng_path), feeds)
    with_att = _eps(TorchRunner(fake_quant_model(loaded.unet, layers, quants)), feeds)
    without = _eps(TorchRunner(fake_quant_model(loaded.unet, layers)), feeds)

    def rel(a, r):
        return float(np.linalg.norm(a - r) / np.linalg.norm(r))

    assert rel(eng, with_att) < 1e-4
    assert rel(without, with_att) > 30 * rel(eng, with_att)
    # TensorRT's graphs keep attention float: its lint (and build) refuse this calibration, with the fix
    from ptqd.stages.build_tensorrt import lint

    with pytest.raises(UserError, match="--attention float"):
        lint(d)
    # the fake-quant model refuses a model whose attention is not the one calibrated, instead of missing quantizers
    import dataclasses

    for bad in ([dataclasses.replace(quants[0], shape=(3, 3))], [dataclasses.replace(quants[0], index=10_000)]):
        with pytest.raises(att.ModelMismatch, match="recalibrate"):
            _eps(TorchRunner(fake_quant_model(loaded.unet, layers, bad)), feeds)


def test_sdpa_scale_is_computed_as_the_exported_graph_computes_it():
    from ptqd.models.attention import sqrt_scale

    for d in (8, 40, 64, 80, 160):
        s = np.float32(1.0) / np.sqrt(np.float32(d))
        assert sqrt_scale(d) == np.sqrt(s) and sqrt_scale(d).dtype == np.float32
    assert float(sqrt_scale(80)) != float(np.float32((1 / 80 ** 0.5) ** 0.5))  # float64 lands one ulp away here


def test_float_attention_is_the_default_and_builds_as_before(tiny_cin_bundle, tmp_path):
    d = _copy(tiny_cin_bundle, tmp_path / "b.bundle")
    rec = api.calibrate(d, samples=2, steps=2, rounding="nearest", progress=False)
    assert rec["attention_matmuls"] == 0 and "attention" not in Bundle.open(d).read_json("calib/w8a8.json")
    with pytest.raises(UserError, match="--attention must be one of"):
        api.calibrate(d, samples=2, steps=2, progress=False, attention="fp8")


def test_openvino_builds_and_validates_int8_attention(tiny_cin_bundle, tmp_path):
    pytest.importorskip("openvino")
    d = _copy(tiny_cin_bundle, tmp_path / "b.bundle")
    api.calibrate(d, samples=2, steps=3, rounding="nearest", progress=False, attention="qk")
    n = len(att.selected_matmuls(Bundle.open(d).read_json(layout.UNET_LAYERS)["layers"], "qk",
                                 Bundle.open(d).path(layout.UNET_ONNX)))
    rec = api.build(d, backend="openvino", precisions=["w8a8"], progress=False)["w8a8"]
    assert rec["attention_matmuls_int8"] == n and rec["buckets"][0]["validation_vs_fake_quant"]["passed"]


def test_source_placement_moves_the_quantizers_up_through_layout_ops_and_computes_the_same(tiny_cin_bundle,
                                                                                           tmp_path):
    """``attention_at="source"`` puts each attention input's Q/DQ where the tensor is made (the q/k/v projection,
    the Softmax), past Reshape/Transpose: the same values, so the same outputs as at the matmul."""
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.qdq import write_qdq
    from ptqd.stages.common import calib_attention, calib_layers

    d = _copy(tiny_cin_bundle, tmp_path / "b.bundle")
    api.calibrate(d, samples=2, steps=2, rounding="nearest", progress=False, attention="int8")
    b = Bundle.open(d)
    layers, quants = calib_layers(b, "w8a8"), calib_attention(b, "w8a8")
    feeds = dict(np.load(b.path(layout.CALIB_FEEDS)))
    out, sources = {}, {}
    for at in ("input", "source"):
        path = tmp_path / f"{at}.onnx"
        write_qdq(b.path(layout.UNET_ONNX), layers, path, attention=quants, attention_at=at)
        g = onnx.load(str(path)).graph
        made_by = {o: n.op_type for n in g.node for o in n.output}
        sources[at] = sorted(made_by.get(n.input[0], "input") for n in g.node
                             if n.op_type == "QuantizeLinear" and n.name[-2:] in ("_a", "_b"))
        out[at] = _eps(OrtRunner(path), feeds)
    assert len(sources["input"]) == 2 * len(quants) and set(sources["input"]) - {"Softmax"} <= {"Reshape", "Transpose"}
    assert set(sources["source"]) == {"MatMul", "Softmax"}  # the projections' outputs and the probabilities
    np.testing.assert_array_equal(out["input"], out["source"])
    with pytest.raises(ValueError, match="attention_at"):
        write_qdq(b.path(layout.UNET_ONNX), layers, tmp_path / "x.onnx", attention=quants, attention_at="output")
