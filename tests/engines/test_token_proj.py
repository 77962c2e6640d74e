"""``token_proj.proj_in_on_tokens``: a transformer's 1x1 proj_in conv, whose output is only laid out as tokens,
becomes that layout on its input and a matmul, for OpenVINO; the graph computes the same values."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ptqd import api
from ptqd.engines import graph_opt
from ptqd.engines.token_proj import proj_in_on_tokens
from tests.conftest import random_unet_feeds


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def rewritten(path):
    ref = onnx.load(str(path))
    m = onnx.load(str(path))
    rec = proj_in_on_tokens(m, graph_opt.evaluated(path)[1])
    onnx.checker.check_model(m)
    return ref, m, rec


@pytest.mark.parametrize("source", ["compvis", "diffusers"])
def test_proj_in_runs_as_a_matmul_on_tokens_and_computes_the_same(source, tiny_cin_bundle, tiny_diffusers_cond,
                                                                 tmp_path):
    """CompVis' SpatialTransformer lays proj_in's output out with Reshape then Transpose (0, 2, 1), diffusers'
    Transformer2DModel with Transpose (0, 2, 3, 1) then Reshape: both are rewritten, at any batch."""
    if source == "compvis":
        path = tiny_cin_bundle / "unet.onnx"
    else:
        api.export(tiny_diffusers_cond, tmp_path / "d.bundle", progress=False)
        path = tmp_path / "d.bundle" / "unet.onnx"
    ref, m, rec = rewritten(path)
    proj_in = [n.name for n in ref.graph.node if n.op_type == "Conv" and "proj_in" in n.name]
    before = collections.Counter(n.op_type for n in ref.graph.node)
    after = collections.Counter(n.op_type for n in m.graph.node)
    assert proj_in and rec["proj_in_on_tokens"] == len(proj_in), (rec, proj_in)
    assert before["Conv"] - after["Conv"] == len(proj_in) and after["MatMul"] - before["MatMul"] == len(proj_in)
    assert not any(n.op_type == "Conv" and "proj_in" in n.name for n in m.graph.node)
    for batch in (1, 3):
        f = random_unet_feeds(ref, batch, seed=batch)
        want = run(ref, f)
        np.testing.assert_allclose(run(m, f), want, atol=1e-5 * max(1.0, float(np.abs(want).max())), rtol=0)


def one_conv(also_an_output: bool, quantized: bool):
    """x [B, 4, 2, 3] → (Q/DQ) → 1x1 conv to 5 channels (+ bias) → Reshape [B, 5, 6] → Transpose (0, 2, 1)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 4, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b"),
             helper.make_tensor("shape", TensorProto.INT64, [3], [0, 5, -1])]
    nodes = []
    x, weight = "x", "w"
    if quantized:
        scale = np.abs(w).reshape(5, -1).max(1) / 127
        inits += [numpy_helper.from_array(np.round(w / scale[:, None, None, None]).astype(np.int8), "w_q"),
                  numpy_helper.from_array(scale.astype(np.float32), "w_s"),
                  numpy_helper.from_array(np.array(0.03, np.float32), "x_s"),
                  numpy_helper.from_array(np.array(0, np.int8), "x_z")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"]),
                  helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["wd"], axis=0)]
        x, weight = "xd", "wd"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes += [helper.make_node("Conv", [x, weight, "b"], ["y"], name="conv", kernel_shape=[1, 1]),
              helper.make_node("Reshape", ["y", "shape"], ["y3"], name="reshape"),
              helper.make_node("Transpose", ["y3"], ["tokens"], name="transpose", perm=[0, 2, 1])]
    outputs = [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["B", 6, 5])]
    if also_an_output:
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 5, 2, 3]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4, 2, 3])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("quantized", [False, True])
def test_a_quantized_conv_keeps_its_integers_and_a_conv_read_elsewhere_stays(quantized):
    """The int8 weight, transposed, keeps its per-output-channel scales (now per column); a conv whose output is
    also read as itself (here: a graph output) is left as it is."""
    shapes = {"y": np.array([1, 5, 2, 3]), "y3": np.array([1, 5, 6]), "tokens": np.array([1, 6, 5])}
    m = one_conv(False, quantized)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    assert proj_in_on_tokens(m, shapes)["proj_in_on_tokens"] == 1
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Conv"] == 0 and ops["MatMul"] == 1, ops
    if quantized:  # the matmul reads the int8 weight through a per-column DequantizeLinear
        dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0].endswith("_wd"))
        w = next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == dq.input[0])
        assert w.dtype == np.int8 and w.shape == (4, 5) and dq.attribute[0].i == 1
    f = {"x": np.random.default_rng(1).standard_normal((2, 4, 2, 3)).astype(np.float32)}
    np.testing.assert_allclose(run(m, f), run(ref, f), atol=1e-5, rtol=0)
    kept = one_conv(True, quantized)
    assert proj_in_on_tokens(kept, shapes)["proj_in_on_tokens"] == 0
