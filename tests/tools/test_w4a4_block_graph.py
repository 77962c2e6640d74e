"""benchmarks/w4a4_block_engine.py: the 4-bit activation quantizers of a QDQ graph taken at run time, in stock
ONNX operators, compute what the torch emulation of w4a4_dynamic.py computes (its latency rows rest on that)."""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from w4a4_block_engine import block_graph  # noqa: E402
from w4a4_outliers import dynamic_act_quant  # noqa: E402

from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def qdq_graph(kind: str, channels: int, clip_on_ints: bool, rng, shape=None, layers: int = 1, top: int = 15):
    """QDQ layers as ptqd writes 4-bit ones: the input on a calibrated uint8 grid held to ``top`` + 1 levels by a
    Clip (on the floats before QuantizeLinear, or on the integers after it), int8 weights per output channel
    (axis 0 for a conv, 1 for a matmul). ``layers`` > 1: that many matmuls share the one quantizer, each behind
    its own DequantizeLinear (as q/k/v read one input). Returns (model, float weights, input shape)."""
    out_ch = 8
    c, nd = numpy_helper.from_array, helper.make_node
    inits = [c(np.float32(0.05), "x_s"), c(np.uint8(3), "x_zp"), c(np.float32(-0.15), "lo_f"),
             c(np.float32(-0.15 + 0.05 * top), "hi_f"), c(np.uint8(0), "lo_i"), c(np.uint8(top), "hi_i")]
    if clip_on_ints:
        nodes = [nd("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq8"]), nd("Clip", ["xq8", "lo_i", "hi_i"], ["xq"])]
    else:
        nodes = [nd("Clip", ["x", "lo_f", "hi_f"], ["xc"]), nd("QuantizeLinear", ["xc", "x_s", "x_zp"], ["xq"])]
    weights, outputs = [], []
    for k in range(layers):
        w_int = rng.integers(-7, 8, size=(out_ch, channels, 3, 3) if kind == "conv" else (channels, out_ch))
        w_scale = rng.uniform(0.01, 0.02, out_ch).astype(np.float32)
        inits += [c(w_int.astype(np.int8), f"w_q{k}"), c(w_scale, f"w_s{k}"),
                  c(np.zeros(out_ch, np.int8), f"w_zp{k}")]
        nodes += [nd("DequantizeLinear", [f"w_q{k}", f"w_s{k}", f"w_zp{k}"], [f"w{k}"], axis=0 if kind == "conv" else 1),
                  nd("DequantizeLinear", ["xq", "x_s", "x_zp"], [f"xd{k}"]),
                  nd("Conv", [f"xd{k}", f"w{k}"], [f"y{k}"], pads=[1, 1, 1, 1]) if kind == "conv"
                  else nd("MatMul", [f"xd{k}", f"w{k}"], [f"y{k}"])]
        weights.append(w_int.astype(np.float32) * (w_scale.reshape(-1, 1, 1, 1) if kind == "conv" else w_scale))
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None))
    shape = shape or ([2, channels, 5, 6] if kind == "conv" else [2, 7, channels])
    g = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), weights, shape


def run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def reference(kind, x, w):
    xq = dynamic_act_quant(1 if kind == "conv" else -1, 16, 1.0)(torch.from_numpy(x))
    w = torch.from_numpy(w)
    return (torch.nn.functional.conv2d(xq, w, padding=1) if kind == "conv" else xq @ w).numpy()


def hard_input(kind, shape, rng):
    """Two groups of 16 channels: one wide, one all positive (its range must still hold 0), one pixel/token whose
    first group is all zero (scale at its floor), and one whose first group hits exact rounding ties."""
    x = rng.standard_normal(shape).astype(np.float32)
    ch = (lambda a, b: (slice(None), slice(a, b))) if kind == "conv" else (lambda a, b: (Ellipsis, slice(a, b)))
    x[ch(0, 16)] *= 4.0
    x[ch(16, 32)] = np.abs(x[ch(16, 32)]) + 0.3
    ties = np.array([0.0, 15.0] + [k + 0.5 for k in range(14)], np.float32)  # range 0..15: scale 1, ties at k + .5
    if kind == "conv":
        x[0, :16, 0, 0], x[0, :16, 1, 1] = 0.0, ties
    else:
        x.reshape(-1, shape[-1])[0, :16], x.reshape(-1, shape[-1])[1, :16] = 0.0, ties
    return x


@pytest.mark.parametrize("kind", ["conv", "matmul"])
@pytest.mark.parametrize("clip_on_ints", [False, True])
def test_block_graph_quantizes_per_pixel_and_group_as_the_torch_emulation(tmp_path, kind, clip_on_ints):
    rng = np.random.default_rng(0)
    model, (w,), shape = qdq_graph(kind, 32, clip_on_ints, rng)
    onnx.save(model, tmp_path / "qdq.onnx")
    x = hard_input(kind, shape, rng)
    rec = block_graph(tmp_path / "qdq.onnx", tmp_path / "blk.onnx", 16)
    assert rec["quantizers"] == 1 and rec["layers"] == 1 and not rec["kept"]
    (got,) = run(tmp_path / "blk.onnx", x)
    want = reference(kind, x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and not what the calibrated per-tensor grid gives
    assert np.abs(run(tmp_path / "qdq.onnx", x)[0] - want).max() > 0.1
    names = {n.op_type for n in onnx.load(tmp_path / "blk.onnx").graph.node}
    assert "QuantizeLinear" not in names and "ReduceMax" in names


@pytest.mark.parametrize("shape", [[5, 32], [2, 3, 4, 32]])
def test_block_graph_shares_one_quantizer_among_the_layers_that_read_it_at_any_rank(tmp_path, shape):
    rng = np.random.default_rng(3)
    model, ws, shape = qdq_graph("matmul", 32, True, rng, shape=shape, layers=3)
    onnx.save(model, tmp_path / "qdq.onnx")
    rec = block_graph(tmp_path / "qdq.onnx", tmp_path / "blk.onnx", 16)
    assert rec["quantizers"] == 1 and rec["layers"] == 3 and not rec["kept"]
    x = hard_input("matmul", shape, rng)
    for got, w in zip(run(tmp_path / "blk.onnx", x), ws):
        np.testing.assert_allclose(got, reference("matmul", x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,top,why", [(24, 15, "24 channels"), (32, 7, "8 levels")])
def test_block_graph_keeps_a_quantizer_it_cannot_take_at_run_time(tmp_path, channels, top, why):
    model, _, shape = qdq_graph("conv", channels, False, np.random.default_rng(1), top=top)
    onnx.save(model, tmp_path / "qdq.onnx")
    rec = block_graph(tmp_path / "qdq.onnx", tmp_path / "blk.onnx", 16)
    assert rec["quantizers"] == 0 and len(rec["kept"]) == 1 and why in rec["kept"][0][1]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "blk.onnx", x)[0], run(tmp_path / "qdq.onnx", x)[0])


def test_block_graph_leaves_a_quantizer_a_graph_output_reads_and_the_models_own_clips(tmp_path):
    model, _, shape = qdq_graph("matmul", 32, False, np.random.default_rng(4))
    model.graph.output.append(helper.make_tensor_value_info("xd0", TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "out.onnx")
    rec = block_graph(tmp_path / "out.onnx", tmp_path / "blk.onnx", 16)
    assert rec["quantizers"] == 0 and "graph output" in rec["kept"][0][1]
    # a ReLU6-like Clip in front of an 8-bit quantizer (256 levels) is the model's, not a 4-bit quantizer
    model, _, shape = qdq_graph("matmul", 32, False, np.random.default_rng(4))
    for init in model.graph.initializer:
        value = {"lo_f": 0.0, "hi_f": 6.0, "x_s": 6.0 / 255}.get(init.name)
        if value is not None:
            init.CopyFrom(numpy_helper.from_array(np.float32(value), init.name))
    onnx.save(model, tmp_path / "relu6.onnx")
    rec = block_graph(tmp_path / "relu6.onnx", tmp_path / "blk6.onnx", 16)
    assert rec["quantizers"] == 0 and not rec["kept"]
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "blk6.onnx", x)[0], run(tmp_path / "relu6.onnx", x)[0])
