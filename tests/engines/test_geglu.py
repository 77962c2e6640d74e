"""GEGLU's projection as two matmuls (``ptqd.engines.geglu.split_geglu``): the cut into two channel halves goes,
the values stay, and anything that is not exactly that cut is left alone."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ptqd.engines import graph_opt as go
from ptqd.engines.geglu import split_geglu


def run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def copy(m):
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out


def test_the_exported_unets_geglu_cuts_become_two_matmuls(tiny_cin_bundle):
    """The tiny CompVis UNet's feed-forwards (Slices whose bounds come from run-time shape arithmetic): every one
    rewritten, every Slice and its shape arithmetic gone, the output the same at batches 1-3."""
    path = tiny_cin_bundle / "unet.onnx"
    exported = onnx.load(str(path))
    m = copy(exported)
    ffs = sum(1 for n in exported.graph.node if n.op_type == "Erf")  # one exact GELU per feed-forward
    rec = split_geglu(m, go.evaluated(path)[0])
    before = collections.Counter(n.op_type for n in exported.graph.node)
    after = collections.Counter(n.op_type for n in m.graph.node)
    assert ffs > 0 and rec == {"split_geglu": ffs}
    assert after["MatMul"] == before["MatMul"] + ffs and after["Slice"] == before["Slice"] - 2 * ffs
    assert after["Shape"] < before["Shape"]
    onnx.checker.check_model(m)
    rng = np.random.default_rng(0)
    for batch in (1, 2, 3):
        feeds = {}
        for i in exported.graph.input:
            shape = [batch if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
            feeds[i.name] = (rng.integers(0, 1000, shape) if i.name == "t" else rng.standard_normal(shape)).astype(dtype)
        np.testing.assert_allclose(run(m, feeds)[0], run(exported, feeds)[0], rtol=1e-5, atol=1e-6)


def geglu_graph(split=(8, 8), extra_reader=False, axis=-1, matmul_out=False):
    """x [B, 5, 6] -> MatMul(DequantizeLinear(int8 W [6, 16], per-column scale, axis 1)) + b -> Split on the last
    axis -> a * sigmoid(gate); with ``extra_reader``, the projection's output is also a graph output."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (6, 16)).astype(np.int8), "wq"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, 16).astype(np.float32), "ws"),
             numpy_helper.from_array(np.zeros(16, np.int8), "wz"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
             numpy_helper.from_array(np.array(split, np.int64), "sizes")]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1, name="dq"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
             helper.make_node("Add", ["y", "b"], ["yb"], name="bias"),
             helper.make_node("Split", ["yb", "sizes"], ["a", "gate"], axis=axis, name="cut"),
             helper.make_node("Sigmoid", ["gate"], ["sg"], name="sig"),
             helper.make_node("Mul", ["a", "sg"], ["out"], name="glu")]
    outs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    if extra_reader:
        outs.append(helper.make_tensor_value_info("yb", TensorProto.FLOAT, None))
    if matmul_out:
        outs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "geglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 5, 6])], outs,
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_quantized_projection_is_split_with_its_scales_and_bias():
    for zero_point in (True, False):  # the weight's zero point as an input, or left out (its default, 0)
        m = geglu_graph()
        if not zero_point:
            assert go.without_weight_zero_points(m) == 1
        ref = copy(m)
        assert split_geglu(m) == {"split_geglu": 1}
        ops = collections.Counter(n.op_type for n in m.graph.node)
        assert ops["Split"] == 0 and ops["MatMul"] == 2 and ops["DequantizeLinear"] == 2
        assert {len(n.input) for n in m.graph.node if n.op_type == "DequantizeLinear"} == {3 if zero_point else 2}
        assert {tuple(i.dims) for i in m.graph.initializer
                if i.data_type == TensorProto.INT8 and len(i.dims) == 2} == {(6, 8)}
        x = {"x": np.random.default_rng(2).standard_normal((3, 5, 6)).astype(np.float32)}
        np.testing.assert_allclose(run(m, x)[0], run(ref, x)[0], rtol=1e-6, atol=1e-6)


def test_anything_but_an_even_cut_read_by_the_cut_alone_is_left_alone():
    old_split = geglu_graph()  # opset 11: the sizes as an attribute
    cut = next(n for n in old_split.graph.node if n.op_type == "Split")
    del cut.input[1]
    cut.attribute.append(helper.make_attribute("split", [7, 9]))
    old_split.opset_import[0].version = 11
    sliced = geglu_graph()  # two Slices without axes: ONNX cuts the leading axis then, not the channels
    g = sliced.graph
    k = next(i for i, n in enumerate(g.node) if n.op_type == "Split")
    del g.node[k]
    g.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), n)
                          for n, v in (("s0", 0), ("s1", 8), ("s2", 16))])
    g.node.insert(k, helper.make_node("Slice", ["yb", "s0", "s1"], ["a"], name="cut_a"))
    g.node.insert(k + 1, helper.make_node("Slice", ["yb", "s1", "s2"], ["gate"], name="cut_gate"))
    cases = (geglu_graph(split=(7, 9)), geglu_graph(extra_reader=True), old_split, sliced,
             geglu_graph(axis=2), geglu_graph(matmul_out=True))
    for m in cases:
        before = m.SerializeToString()
        assert split_geglu(m) == {"split_geglu": 0}
        assert m.SerializeToString() == before
