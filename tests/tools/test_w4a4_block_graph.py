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


def qdq_layer(kind: str, channels: int, clip_on_ints: bool, rng):
    """A one-layer QDQ graph as ptqd writes 4-bit layers: the input on a calibrated uint8 grid held to 16 levels by
    a Clip (on the floats before QuantizeLinear, or on the integers after it), int8 weights per output channel."""
    out_ch = 8
    w_int = rng.integers(-7, 8, size=(out_ch, channels, 3, 3) if kind == "conv" else (channels, out_ch)).astype(np.int8)
    w_scale = rng.uniform(0.01, 0.02, out_ch).astype(np.float32)
    c = numpy_helper.from_array
    inits = [c(w_int, "w_q"), c(w_scale, "w_s"), c(np.zeros(out_ch, np.int8), "w_zp"),
             c(np.float32(0.05), "x_s"), c(np.uint8(3), "x_zp"),
             c(np.float32(-0.15), "lo_f"), c(np.float32(0.6), "hi_f"), c(np.uint8(0), "lo_i"), c(np.uint8(15), "hi_i")]
    nd = helper.make_node
    nodes = [nd("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], axis=0 if kind == "conv" else 1)]
    if clip_on_ints:
        nodes += [nd("QuantizeLinear", ["x", "x_s", "x_zp"], ["xq8"]), nd("Clip", ["xq8", "lo_i", "hi_i"], ["xq"])]
    else:
        nodes += [nd("Clip", ["x", "lo_f", "hi_f"], ["xc"]), nd("QuantizeLinear", ["xc", "x_s", "x_zp"], ["xq"])]
    nodes.append(nd("DequantizeLinear", ["xq", "x_s", "x_zp"], ["xd"]))
    nodes.append(nd("Conv", ["xd", "w"], ["y"], pads=[1, 1, 1, 1]) if kind == "conv"
                 else nd("MatMul", ["xd", "w"], ["y"]))
    shape = [2, channels, 5, 6] if kind == "conv" else [2, 7, channels]
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    w = (w_int.astype(np.float32) * (w_scale.reshape(-1, 1, 1, 1) if kind == "conv" else w_scale)).astype(np.float32)
    return model, w, shape


def run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.mark.parametrize("kind", ["conv", "matmul"])
@pytest.mark.parametrize("clip_on_ints", [False, True])
def test_block_graph_quantizes_per_pixel_and_group_as_the_torch_emulation(tmp_path, kind, clip_on_ints):
    rng = np.random.default_rng(0)
    model, w, shape = qdq_layer(kind, 32, clip_on_ints, rng)
    onnx.save(model, tmp_path / "qdq.onnx")
    x = rng.standard_normal(shape).astype(np.float32)
    wide = (slice(None), slice(0, 16)) if kind == "conv" else (Ellipsis, slice(0, 16))
    x[wide] *= 4.0  # one group of 16 channels far wider than the other
    rest = (slice(None), slice(16, None)) if kind == "conv" else (Ellipsis, slice(16, None))
    x[rest] = np.abs(x[rest]) + 0.3  # and all positive: its range must still hold 0 exactly
    rec = block_graph(tmp_path / "qdq.onnx", tmp_path / "blk.onnx", 16)
    assert rec["quantizers"] == 1 and rec["layers"] == 1 and not rec["kept"]
    got = run(tmp_path / "blk.onnx", x)
    quant = dynamic_act_quant(1 if kind == "conv" else -1, 16, 1.0)
    xq = quant(torch.from_numpy(x))
    want = (torch.nn.functional.conv2d(xq, torch.from_numpy(w), padding=1) if kind == "conv"
            else xq @ torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and not what the calibrated per-tensor grid gives
    assert np.abs(run(tmp_path / "qdq.onnx", x) - want).max() > 0.1
    names = {n.op_type for n in onnx.load(tmp_path / "blk.onnx").graph.node}
    assert "QuantizeLinear" not in names and "ReduceMax" in names


def test_block_graph_keeps_a_quantizer_whose_channels_the_group_does_not_divide(tmp_path):
    model, _, shape = qdq_layer("conv", 24, False, np.random.default_rng(1))
    onnx.save(model, tmp_path / "qdq.onnx")
    rec = block_graph(tmp_path / "qdq.onnx", tmp_path / "blk.onnx", 16)
    assert rec["quantizers"] == 0 and len(rec["kept"]) == 1 and "24 channels" in rec["kept"][0][1]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(tmp_path / "blk.onnx", x), run(tmp_path / "qdq.onnx", x))
