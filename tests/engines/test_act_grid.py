"""``ptqd build --backend openvino --act-grid``: which 8-bit layer inputs go on a symmetric grid (int8 without a
zero point in the engine), the bias kept on the new accumulator scale, and the int8 form computing the same values
as the u8 one."""

import dataclasses

import numpy as np
import pytest

from ptqd.calib.calibrate import LayerQuant
from ptqd.calib.quant import ActQuant, act_params
from ptqd.engines.openvino import openvino_layers, signed_grid
from ptqd.errors import UserError


def _layer(name, lo, hi, bits=8, bias=True):
    rng = np.random.default_rng(len(name))
    a = act_params(lo, hi, bits)
    w_scale = rng.uniform(0.01, 0.02, 4).astype(np.float32)
    b = rng.normal(0, 0.5, 4)
    bias_q = np.round(b / (np.float32(a.scale) * w_scale).astype(np.float64)).astype(np.int32) if bias else None
    return LayerQuant(name, name, "Conv", 8, bits, a, act_params(-1, 1, 8), rng.integers(-63, 64, (4, 3, 3, 3)).astype(
        np.int8), w_scale, bias_q=bias_q)


def test_only_inputs_within_the_step_limit_move_and_the_bias_stays():
    layers = [_layer("norm", -3.5, 3.8), _layer("silu", -0.28, 4.0), _layer("relu", 0.0, 4.0),
              _layer("a4", -3.5, 3.8, bits=4), _layer("nobias", -2.0, 2.2, bias=False)]
    kept = openvino_layers(layers)
    assert [lq.act_in for lq in kept] == [lq.act_in for lq in layers] and all(lq.act_out is None for lq in kept)
    mixed = {lq.name: lq for lq in openvino_layers(layers, 1.25)}
    signed = {lq.name: lq for lq in openvino_layers(layers, float("inf"))}
    for moved, name in ((mixed, "norm"), (mixed, "nobias"), (signed, "norm"), (signed, "silu"), (signed, "nobias")):
        a, old = moved[name].act_in, next(lq.act_in for lq in layers if lq.name == name)
        assert (a.zero_point, a.bits) == (128, 8), name
        lo, hi = old.range
        assert a.range[0] <= lo and a.range[1] >= hi * (1 - 1e-6) and a.scale >= old.scale, name  # still covers it
    assert mixed["silu"].act_in == layers[1].act_in  # its symmetric step would be 1.9x: not moved under 1.25
    assert signed["silu"].act_in.scale > 1.8 * layers[1].act_in.scale
    for d in (mixed, signed):  # non-negative inputs keep u8 without a zero point, 4-bit grids are not touched
        assert d["relu"].act_in == layers[2].act_in and d["a4"].act_in == layers[3].act_in
    assert signed["nobias"].bias_q is None
    # the float bias is the same up to half a step of the new accumulator scale
    old, new = layers[1], signed["silu"]
    b_old = old.bias_q * old.bias_scale.astype(np.float64)
    b_new = new.bias_q * new.bias_scale.astype(np.float64)
    assert np.all(np.abs(b_new - b_old) <= 0.5 * new.bias_scale + 1e-12)
    assert not np.array_equal(new.bias_q, old.bias_q)


def test_a_symmetric_grid_is_the_int8_grid_shifted_by_128():
    a = signed_grid(act_params(-2.0, 3.0, 8), float("inf"))
    x = np.linspace(-4, 4, 1001).astype(np.float32)
    as_int8 = np.clip(np.round(x / a.scale), -128, 127) * np.float32(a.scale)
    np.testing.assert_array_equal(a.fake(x), as_int8.astype(np.float32))
    assert signed_grid(a, float("inf")) is a  # already symmetric
    assert signed_grid(ActQuant(0.1, 0, 8), float("inf")).zero_point == 0  # non-negative: unchanged


def _conv_silu_conv(tmp_path, seed: int):
    """A conv - SiLU - conv net exported to ONNX: (the ONNX path, its two Conv node names, the net, an input x, the
    second conv's input)."""
    import onnx
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    fp = tmp_path / "fp.onnx"
    torch.onnx.export(net, (x,), str(fp), input_names=["x"], output_names=["y"], dynamo=False)
    convs = [n.name for n in onnx.load(str(fp)).graph.node if n.op_type == "Conv"]
    with torch.no_grad():
        h = torch.nn.functional.silu(net[0](x))
    return fp, convs, net, x, h


def _reference_run(path, x):
    """The graph at ``path`` on ONNX Runtime's reference kernels (no fusion)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


def test_int8_zero_points_compute_the_same_values_as_u8(tmp_path):
    """The QDQ graph with signed=True writes the moved quantizers as int8 with zero point 0; ONNX Runtime's
    reference kernels (no fusion) give bit-identical outputs for both forms."""
    import onnx

    from ptqd.engines.qdq import write_qdq

    fp, convs, net, x, h = _conv_silu_conv(tmp_path, 0)
    layers = []
    for name, mod, inp in ((convs[0], net[0], x), (convs[1], net[2], h)):
        w = mod.weight.detach().numpy()
        w_scale = (np.abs(w).reshape(len(w), -1).max(1) / 63).astype(np.float32)
        a = act_params(float(inp.min()), float(inp.max()), 8)
        b = mod.bias.detach().double().numpy()
        lq = LayerQuant(name, name, "Conv", 8, 8, a, None,
                        np.round(w / w_scale[:, None, None, None]).astype(np.int8), w_scale,
                        bias_q=np.round(b / (np.float32(a.scale) * w_scale).astype(np.float64)).astype(np.int32))
        layers.append(lq)
    moved = openvino_layers(layers, float("inf"))
    assert [lq.act_in.zero_point for lq in moved] == [128, 128]
    out = {}
    for signed in (False, True):
        q = tmp_path / f"q{signed}.onnx"
        write_qdq(fp, moved, q, signed=signed)
        zps = {i.name: i.data_type for i in onnx.load(str(q)).graph.initializer if i.name.endswith("_x_zp")}
        want = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
        assert zps and set(zps.values()) == {want}
        out[signed] = _reference_run(q, x)
    np.testing.assert_array_equal(out[True], out[False])
    # a quantizer that is not on the symmetric grid stays u8 with its zero point, signed or not
    asym = [dataclasses.replace(lq, act_out=None) for lq in layers]
    assert all(lq.act_in.zero_point not in (0, 128) for lq in asym)
    write_qdq(fp, asym, tmp_path / "asym.onnx", signed=True)
    zps = [i.data_type for i in onnx.load(str(tmp_path / "asym.onnx")).graph.initializer if i.name.endswith("_x_zp")]
    assert set(zps) == {onnx.TensorProto.UINT8}


def test_4bit_inputs_as_int8_without_zero_point_compute_the_same_values(tmp_path):
    """``write_qdq(signed_low_bits=True)``: a 4-bit input's 16 levels (j − z)·s are the integers −z..15 − z times s;
    written as int8 with zero point 0 behind its Clip, ONNX Runtime's reference kernels give bit-identical outputs
    to the u8 form with the zero point. So does the Clip moved after the QuantizeLinear, onto the integers
    (``low_bits_clip="int"``, ONNX Runtime's engines), in either form."""
    import onnx

    from ptqd.engines.qdq import write_qdq

    fp, convs, net, x, h = _conv_silu_conv(tmp_path, 1)
    layers = []
    for name, mod, inp, (lo, hi) in ((convs[0], net[0], x, (-1.5, 1.2)), (convs[1], net[2], h, (-0.28, 1.0))):
        w = mod.weight.detach().numpy()
        w_scale = (np.abs(w).reshape(len(w), -1).max(1) / 7).astype(np.float32)
        a = act_params(lo, hi, 4)  # narrower than the data: the Clip matters
        b = mod.bias.detach().double().numpy()
        layers.append(LayerQuant(name, name, "Conv", 4, 4, a, None,
                                 np.round(w / w_scale[:, None, None, None]).astype(np.int8), w_scale,
                                 bias_q=np.round(b / (np.float32(a.scale) * w_scale).astype(np.float64)).astype(np.int32)))
    assert all(0 < lq.act_in.zero_point < 15 for lq in layers)
    out = {}
    for low in (False, True):
        for clip in ("float", "int"):  # the Clip before the QuantizeLinear, or on its integers after it
            q = tmp_path / f"q{low}{clip}.onnx"
            write_qdq(fp, layers, q, signed=True, signed_low_bits=low, low_bits_clip=clip)
            g = onnx.load(str(q)).graph
            zps = {i.name: i.data_type for i in g.initializer if i.name.endswith("_x_zp")}
            assert zps and set(zps.values()) == {onnx.TensorProto.INT8 if low else onnx.TensorProto.UINT8}
            clips = [n for n in g.node if n.op_type == "Clip"]
            feeds_q = {i for n in g.node if n.op_type == "QuantizeLinear" for i in n.input}
            assert len(clips) == 2 and all((c.output[0] in feeds_q) == (clip == "float") for c in clips)
            out[low, clip] = _reference_run(q, x)
    for k in out:
        np.testing.assert_array_equal(out[k], out[False, "float"], err_msg=str(k))
    assert np.abs(out[False, "float"]).max() > 0


def test_a_shared_4bit_quantizer_is_clipped_once_in_either_form(tmp_path):
    """Two layers reading one tensor on one 4-bit grid share its QuantizeLinear; with the Clip on the integers the
    shared tensor is the clipped one, and both forms compute the same values."""
    import onnx
    import torch

    from ptqd.engines.qdq import write_qdq

    class TwoReaders(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    torch.manual_seed(2)
    net, x = TwoReaders(), torch.randn(2, 3, 8, 8)
    fp = tmp_path / "fp.onnx"
    torch.onnx.export(net, (x,), str(fp), input_names=["x"], output_names=["y"], dynamo=False)
    convs = [n.name for n in onnx.load(str(fp)).graph.node if n.op_type == "Conv"]
    a = act_params(-1.0, 1.3, 4)  # narrower than x: the Clip matters
    layers = []
    for name, mod in zip(convs, (net.a, net.b)):
        w = mod.weight.detach().numpy()
        w_scale = (np.abs(w).reshape(len(w), -1).max(1) / 7).astype(np.float32)
        b = mod.bias.detach().double().numpy()
        layers.append(LayerQuant(name, name, "Conv", 4, 4, a, None,
                                 np.round(w / w_scale[:, None, None, None]).astype(np.int8), w_scale,
                                 bias_q=np.round(b / (np.float32(a.scale) * w_scale).astype(np.float64)).astype(np.int32)))
    out = {}
    for clip in ("float", "int"):
        q = tmp_path / f"{clip}.onnx"
        write_qdq(fp, layers, q, low_bits_clip=clip)
        ops = [n.op_type for n in onnx.load(str(q)).graph.node]
        assert ops.count("Clip") == 1 and ops.count("QuantizeLinear") == 1, ops  # one quantizer, shared
        out[clip] = _reference_run(q, x)
    np.testing.assert_array_equal(out["int"], out["float"])


def test_an_unknown_act_grid_is_refused_before_any_work(tmp_path):
    from ptqd.stages.build_openvino import build_openvino

    with pytest.raises(UserError, match="--act-grid must be auto or one of signed, mixed, unsigned"):
        build_openvino(tmp_path / "missing.bundle", act_grid="wide")


def test_auto_takes_signed_grids_only_where_the_cpu_has_amx_int8():
    from ptqd.stages.build_openvino import act_grid_choice

    amx = ["avx2", "avx512f", "avx512_vnni", "amx_int8", "avx512_bf16", "amx_bf16"]
    zen4 = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert act_grid_choice("auto", amx)[0] == "signed" and "AMX-INT8" in act_grid_choice("auto", amx)[1]
    assert act_grid_choice("auto", zen4)[0] == "unsigned" and act_grid_choice("auto", ["avx2"])[0] == "unsigned"
    for g in ("signed", "mixed", "unsigned"):  # asked for by name: the same on every CPU
        assert act_grid_choice(g, zen4) == act_grid_choice(g, amx) == (g, f"--act-grid {g}")


def test_cli_build_act_grid_mixed_keeps_silu_inputs_unsigned(compiled, tmp_path, capsys):
    """`ptqd build --act-grid mixed`: the transformer blocks' inputs go signed, SiLU's outputs keep u8 and their zero
    points; the build says so and records it, and the engine validates."""
    import shutil

    pytest.importorskip("openvino")
    from ptqd.bundle import Bundle, layout
    from ptqd.cli import main

    out = tmp_path / "demo.bundle"
    shutil.copytree(compiled[0], out)
    assert main(["build", str(out), "--backend", "openvino", "--precisions", "w8a8", "--act-grid", "mixed"]) == 0
    printed = capsys.readouterr().out
    assert "(mixed; --act-grid mixed)" in printed and "w8a8: layer inputs int8 symmetric" in printed
    rec = layout.built(Bundle.open(out), "openvino")["w8a8"]
    grids = rec["activation_grids"]
    assert rec["act_grid"] == "mixed" and grids["int8 symmetric"] > 0 and grids["u8 zero point"] > 0, grids
    assert rec["validation_vs_fake_quant"]["passed"]
