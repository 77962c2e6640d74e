"""``write_qdq(inputs_at="source")``: a layer's input Q/DQ above the layout ops that feed it (OpenVINO's layout)."""

import shutil

import numpy as np
import onnx
import pytest

from ptqd import api
from ptqd.bundle import Bundle, layout

LAYOUT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}


@pytest.fixture(scope="module")
def calibrated(tiny_cin_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "b.bundle"
    shutil.copytree(tiny_cin_bundle, d)
    api.calibrate(d, samples=2, steps=2, rounding="nearest", progress=False)
    return d


@pytest.mark.parametrize("precision,signed", [("w8a8", False), ("w4a8", True), ("w4a4", True)])
def test_layer_inputs_at_source_compute_the_same_and_skip_attention_outputs(calibrated, tmp_path, precision, signed):
    """proj_out reads the tokens transposed back to NCHW: at "source" its input quantizer sits where the tensor is
    made, above the Reshape/Transpose, and the graph computes exactly what it computes with the quantizer on the
    conv's input (per-tensor quantization commutes with layout ops). Attention's output projection, whose input
    comes from P·V through the heads' merge, keeps its quantizer (the one-key rewrite matches that merge)."""
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.qdq import write_qdq
    from ptqd.stages.common import calib_layers

    b = Bundle.open(calibrated)
    layers = calib_layers(b, precision)
    if signed:  # OpenVINO's layout: symmetric 8-bit inputs as int8 with zero point 0 (a 4-bit input keeps its Clip)
        from ptqd.engines.openvino import openvino_layers
        from ptqd.stages.build_openvino import ACT_GRIDS

        layers = openvino_layers(layers, ACT_GRIDS["signed"])
    feeds = dict(np.load(b.path(layout.CALIB_FEEDS)))
    args = (feeds["x"][:4], feeds["t"][:4], feeds["context"][:4] if "context" in feeds else None)
    out, made, moved = {}, {}, {}
    for at in ("input", "source"):
        path = tmp_path / f"{at}.onnx"
        moved[at] = write_qdq(b.path(layout.UNET_ONNX), layers, path, inputs_at=at,
                              signed=signed)["inputs_moved_to_source"]
        g = onnx.load(str(path)).graph
        producer = {o: n for n in g.node for o in n.output}
        def source(t):  # the op that makes tensor t, looking through a 4-bit input's Clip
            p = producer.get(t)
            p = producer.get(p.input[0]) if p is not None and p.op_type == "Clip" else p
            return p.op_type if p is not None else "input"

        # each layer's input Q: the op that makes the tensor it quantizes
        made[at] = {n.name[:-len("_QuantizeLinear_x")]: source(n.input[0]) for n in g.node
                    if n.name.endswith("_QuantizeLinear_x")}
        out[at] = OrtRunner(path)(*args)
    assert moved["input"] == 0 and moved["source"] > 0
    now_at_source = [k for k in made["input"] if made["input"][k] in LAYOUT and made["source"][k] not in LAYOUT]
    assert len(now_at_source) == moved["source"], (made, moved)
    assert all("proj_out" in k for k in now_at_source), now_at_source
    # attention's output projections read P·V through layout ops and stay where they were
    to_out = [k for k in made["input"] if "to_out" in k]
    assert to_out and all(made["source"][k] == made["input"][k] for k in to_out)
    np.testing.assert_array_equal(out["input"], out["source"])
    with pytest.raises(ValueError, match="inputs_at"):
        write_qdq(b.path(layout.UNET_ONNX), layers, tmp_path / "x.onnx", inputs_at="output")


@pytest.mark.parametrize("also_an_output", [False, True])
def test_a_graph_output_between_the_layout_ops_stops_the_move(tmp_path, also_an_output):
    """x → Relu → Transpose → MatMul: the MatMul's input Q/DQ moves above the Transpose, unless the transposed
    tensor is also a graph output, whose float values a moved quantizer would round."""
    from onnx import TensorProto, helper, numpy_helper

    from ptqd.calib.calibrate import LayerQuant
    from ptqd.calib.quant import ActQuant
    from ptqd.engines.qdq import write_qdq

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 4)).astype(np.float32)
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])]
    if also_an_output:
        outputs.append(helper.make_tensor_value_info("xt", TensorProto.FLOAT, [3, 2]))
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["xr"], name="relu"),
         helper.make_node("Transpose", ["xr"], ["xt"], perm=[1, 0], name="tr"),
         helper.make_node("MatMul", ["xt", "w"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], outputs,
        [numpy_helper.from_array(w, "w")])
    fp = tmp_path / "fp.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(fp))
    lq = LayerQuant("mm", "mm", "MatMul", 8, 8, ActQuant(0.02, 0, 8), None,
                    np.round(w.T / 0.01).astype(np.int8), np.full(4, 0.01, np.float32))
    rec = write_qdq(fp, [lq], tmp_path / "q.onnx", inputs_at="source")
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    producer = {o: n for n in q.node for o in n.output}
    quantized = producer[next(n for n in q.node if n.name.endswith("_QuantizeLinear_x")).input[0]].op_type
    assert rec["inputs_moved_to_source"] == (0 if also_an_output else 1)
    assert quantized == ("Transpose" if also_an_output else "Relu")
    if also_an_output:  # the output still holds the exact float values
        assert producer["xt"].op_type == "Transpose" and producer["xt"].input[0] == "xr"
