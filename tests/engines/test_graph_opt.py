"""The ONNX Runtime engines' graph rewrites (``ptqd.engines.graph_opt``): shape arithmetic folded to constants and
attention as one MultiHeadAttention node (several heads) or bare matmuls (one head) compute what the exported graph
computes, at every batch size."""

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ptqd.engines import graph_opt as go
from tests.conftest import random_unet_feeds


def run(model, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


@pytest.fixture(scope="module")
def exported(tiny_cin_bundle):
    return onnx.load(str(tiny_cin_bundle / "unet.onnx"))


def test_folding_removes_the_shape_arithmetic_and_keeps_every_batch(exported):
    m = onnx.ModelProto()
    m.CopyFrom(exported)
    rec = go.fold_shapes(m)
    before = collections.Counter(n.op_type for n in exported.graph.node)
    after = collections.Counter(n.op_type for n in m.graph.node)
    assert rec["folded"] > 10 and rec["removed_nodes"] > 50, rec
    assert after["Shape"] < before["Shape"] and after["Concat"] < before["Concat"], (before, after)
    # a batch that was never evaluated (3) runs as well as the two that were: -1 takes the batch axis
    for batch in (1, 2, 3):
        f = random_unet_feeds(exported, batch)
        np.testing.assert_array_equal(run(m, f), run(exported, f))


def test_single_head_attention_drops_its_head_split_and_one_key_attention_is_v(exported):
    """The tiny CompVis UNet has one head per block, as cin256-v2 does: each self-attention core becomes the bare
    Softmax(q·kᵀ·s)·v on [B, L, C] (ONNX Runtime's MultiHeadAttention runs one head on one thread), and each
    cross-attention on the one class token (one key: softmax is exactly 1) becomes v broadcast, its q and k
    projections pruned."""
    m = onnx.ModelProto()
    m.CopyFrom(exported)
    before = collections.Counter(n.op_type for n in exported.graph.node)
    rec = go.fuse_attention(m)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert before["Softmax"] == 8 and rec["fused_attention"] == 0, rec
    assert rec["single_head_attention"] == 4 and rec["single_key_attention"] == 4, rec
    assert ops["MultiHeadAttention"] == 0 and ops["Softmax"] == 4 and ops["Expand"] == 4, ops
    # self-attention: q, k, v and output head splits gone (4 Transposes), k's transpose kept; one key: all 5 gone
    assert before["Transpose"] - ops["Transpose"] == 4 * 4 + 4 * 5, (before, ops)
    # one key: q·kᵀ, p·v and the q and k projections (MatMuls on the tokens and on the context) pruned
    assert before["MatMul"] - ops["MatMul"] == 4 * 4, (before, ops)
    # the pruned projections are named (a build leaves them out of its integer-MAC share)
    assert len(rec["pruned_layers"]) == 8 and all("attn2/to_q" in x or "attn2/to_k" in x for x in rec["pruned_layers"])
    # the output projection (matmul and bias) runs on the one token: the Expand broadcasts its result
    producer = {o: n for n in m.graph.node for o in n.output}
    expanded = [producer[n.input[0]] for n in m.graph.node if n.op_type == "Expand"]
    assert rec["one_token_nodes"] == 4 * 2 and all(p.op_type == "Add" and "to_out" in p.name for p in expanded), expanded
    for batch in (1, 3):
        f = random_unet_feeds(exported, batch, seed=batch)
        ref = run(exported, f)
        np.testing.assert_allclose(run(m, f), ref, atol=2e-5 * max(1.0, float(np.abs(ref).max())), rtol=0)


def test_multi_head_attention_fuses_into_one_kernel_at_every_batch():
    m = attention_graph(heads=4, d=8, L=10)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    rec = go.fuse_attention(m)
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert rec["fused_attention"] == 1 and rec["single_head_attention"] == 0
    assert ops == {"MultiHeadAttention": 1}, ops
    for batch in (1, 3):
        f = {x: np.random.default_rng(i).standard_normal((batch, 10, 32)).astype(np.float32) for i, x in enumerate("qkv")}
        np.testing.assert_allclose(run(m, f), run(ref, f), atol=1e-5, rtol=0)


def attention_graph(perm_q=(0, 2, 1, 3), scale=0.125, heads=2, d=8, L=6):
    """q, k, v [B, L, H*d] -> the exported decomposed layout, with the q transpose and the scale as given."""
    C = heads * d
    nodes, inits = [], [helper.make_tensor("split", TensorProto.INT64, [4], [0, L, heads, d]),
                        helper.make_tensor("merge", TensorProto.INT64, [3], [-1, L, d]),
                        helper.make_tensor("back", TensorProto.INT64, [4], [-1, heads, L, d]),
                        helper.make_tensor("out_shape", TensorProto.INT64, [3], [0, L, C]),
                        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale])]
    for n in "qkv":
        nodes += [helper.make_node("Reshape", [n, "split"], [f"{n}s"]),
                  helper.make_node("Transpose", [f"{n}s"], [f"{n}t"], perm=list(perm_q if n == "q" else (0, 2, 1, 3))),
                  helper.make_node("Reshape", [f"{n}t", "merge"], [f"{n}m"])]
    nodes += [helper.make_node("Transpose", ["km"], ["kT"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["qm", "kT"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vm"], ["o"]),
              helper.make_node("Reshape", ["o", "back"], ["ob"]),
              helper.make_node("Transpose", ["ob"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "out_shape"], ["out"])]
    ins = [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", L, C]) for x in "qkv"]
    g = helper.make_graph(nodes, "att", ins, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", L, C])],
                          inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("scale", [8 ** -0.5, 0.3])
def test_a_custom_scale_is_kept(scale):
    m = attention_graph(scale=scale)
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    assert go.fuse_attention(m)["fused_attention"] == 1
    node = next(n for n in m.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == 2 and (("scale" in attrs) == (scale == 0.3))
    f = {x: np.random.default_rng(i).standard_normal((3, 6, 16)).astype(np.float32) for i, x in enumerate("qkv")}
    np.testing.assert_allclose(run(m, f), run(ref, f), atol=1e-5, rtol=0)


def test_a_layout_that_is_not_the_head_split_is_left_alone():
    """q transposed (0, 1, 2, 3) is not attention over heads: fusing it would compute something else."""
    m = attention_graph(perm_q=(0, 1, 2, 3))
    assert go.fuse_attention(m)["fused_attention"] == 0
    assert any(n.op_type == "Softmax" for n in m.graph.node)


def test_a_graph_with_another_dynamic_axis_is_not_folded(exported):
    m = onnx.ModelProto()
    m.CopyFrom(exported)
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    assert go.fold_shapes(m) == {"folded": 0, "skipped": "a dynamic axis other than the batch"}


def test_weight_zero_points_of_zero_are_left_out_and_the_values_stay():
    """``without_weight_zero_points``: a weight's all-zero zero point goes (ONNX's default), a non-zero one and an
    activation's stay, and the graph computes the same."""
    from onnx import numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-8, 8, (4, 3)).astype(np.int8), "w0"),
             numpy_helper.from_array(rng.integers(-8, 8, (4, 3)).astype(np.int8), "w1"),
             numpy_helper.from_array(np.full(3, 0.1, np.float32), "s"),
             numpy_helper.from_array(np.zeros(3, np.int8), "z0"),
             numpy_helper.from_array(np.array([0, 1, 0], np.int8), "z1"),
             numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
             numpy_helper.from_array(np.array(0, np.uint8), "zx")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w0", "s", "z0"], ["wd0"], axis=1),
             helper.make_node("DequantizeLinear", ["w1", "s", "z1"], ["wd1"], axis=1),
             helper.make_node("MatMul", ["xd", "wd0"], ["y0"]), helper.make_node("MatMul", ["xd", "wd1"], ["y1"]),
             helper.make_node("Add", ["y0", "y1"], ["y"])]
    g = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    assert go.without_weight_zero_points(m) == 1
    assert [len(n.input) for n in m.graph.node if n.op_type == "DequantizeLinear"] == [3, 2, 3]
    assert "z0" not in {i.name for i in m.graph.initializer}
    x = {"x": rng.uniform(0, 5, (2, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run(m, x), run(ref, x))
