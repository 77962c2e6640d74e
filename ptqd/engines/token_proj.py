"""A transformer's 1x1 ``proj_in`` conv as a matmul on its tokens (``proj_in_on_tokens``): a graph rewrite for
OpenVINO that keeps the numerics.

A spatial transformer (CompVis' SpatialTransformer, diffusers' Transformer2DModel without linear projections)
runs ``proj_in`` as a 1x1 conv on the [B, C, H, W] map, then lays the result out as tokens, [B, HW, C], with a
Reshape and a Transpose. OpenVINO's CPU plugin runs the conv in its channel-last layout, reorders the float
result to the planar layout and then transposes it to tokens: two copies of a float tensor for what is, in
memory, the layout the conv produced. At full-size cin256-v2 (batch 1, 32x32 blocks) the conv takes 0.13 ms and
the reorder and Transpose after it 0.37 ms (``benchmarks/openvino_layouts.py``'s executed graph).

The rewrite lays out the conv's *input* as tokens instead (the same Reshape and Transpose, now on the tensor the
layer's input quantizer makes, so OpenVINO moves int8 values) and computes the layer as a matmul on them: the
1x1 kernel [C', C, 1, 1] as a [C, C'] matrix, its per-output-channel scales now per column, the bias added after.
Every output value is the same integer dot product times the same scale plus the same bias, so the engine
computes what it computed before; the calibration, the fake-quant model and the layer table keep the conv.
"""

from __future__ import annotations

import numpy as np

from ptqd.engines.onnx_io import attr, dequantized_const, graph_index, prune


def _perm(n) -> list[int]:
    return list(attr(n, "perm", []))


def _tokens_of(conv, readers: dict, shapes: dict):
    """(layout nodes, tokens tensor) when the conv's output is laid out as [B, HW, C'] tokens by Reshape [B, C', HW]
    then Transpose (0, 2, 1), or Transpose (0, 2, 3, 1) then Reshape [B, HW, C'], and read by nothing else (Shape
    readers aside), else None. ``shapes``: batch-1 shapes of Reshape and Transpose outputs."""
    out = conv.output[0]
    values = [r for r in readers.get(out, []) if r.op_type != "Shape"]
    if len(values) != 1:
        return None
    first = values[0]
    nxt = [r for r in readers.get(first.output[0], [])]
    if len(nxt) != 1 or first.input[0] != out:
        return None
    second = nxt[0]
    if first.op_type == "Reshape" and second.op_type == "Transpose" and _perm(second) == [0, 2, 1]:
        pass
    elif first.op_type == "Transpose" and _perm(first) == [0, 2, 3, 1] and second.op_type == "Reshape":
        pass
    else:
        return None
    conv_shape, tok_shape = shapes.get(first.input[0]), shapes.get(second.output[0])
    if conv_shape is None or tok_shape is None or len(conv_shape) != 4 or len(tok_shape) != 3:
        return None
    _, c, h, w = (int(v) for v in conv_shape)
    if [int(v) for v in tok_shape] != [1, h * w, c]:
        return None
    return [first, second], second.output[0]


def proj_in_on_tokens(model, shapes: dict[str, np.ndarray]) -> dict:
    """Rewrite, in place, every 1x1 conv (stride 1, no padding, one group) whose output is only laid out as
    tokens into that layout on its input and a matmul (module docstring). ``shapes``: batch-1 shapes of the
    graph's Reshape/Transpose inputs and outputs (:func:`ptqd.engines.graph_opt.evaluated`). A Shape reader of
    the conv's output (the exporter's shape arithmetic) reads an equal shape made from the input's.
    Returns {"proj_in_on_tokens": count, "removed_nodes": n}."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer, readers, outputs = graph_index(g)
    after: dict = {}  # id(node) -> nodes to insert after it
    done = 0
    for conv in list(g.node):
        if conv.op_type != "Conv" or conv.output[0] in outputs:
            continue
        if attr(conv, "group", 1) != 1 or any(v != 1 for v in attr(conv, "strides", [1, 1])) \
                or any(v != 0 for v in attr(conv, "pads", [0, 0, 0, 0])) \
                or any(v != 1 for v in attr(conv, "dilations", [1, 1])):
            continue
        # the weight: a float initializer, or the DequantizeLinear of an int8 one (per output channel, axis 0)
        wname = conv.input[1]
        dq = dequantized_const(wname, inits, producer)
        if wname in inits:
            w, wdq = numpy_helper.to_array(inits[wname]), None
        elif dq is not None and attr(dq, "axis", 1) == 0 and len(readers.get(wname, [])) == 1:
            w, wdq = numpy_helper.to_array(inits[dq.input[0]]), dq
        else:
            continue
        if w.ndim != 4 or w.shape[2:] != (1, 1):
            continue
        found = _tokens_of(conv, readers, shapes)
        shape_readers = [r for r in readers.get(conv.output[0], []) if r.op_type == "Shape"]
        if found is None or any(r.attribute for r in shape_readers):  # (a Shape's start/end: not rewritten)
            continue
        layout_nodes, tokens = found
        c_out, c_in = int(w.shape[0]), int(w.shape[1])
        base = f"{conv.name or conv.output[0]}__on_tokens"
        x = conv.input[0]
        mat = np.ascontiguousarray(w.reshape(c_out, c_in).T)
        g.initializer.append(numpy_helper.from_array(mat, f"{base}_w"))
        new = [helper.make_node("Reshape", [x, f"{base}_shape"], [f"{base}_x3"], name=f"{base}_reshape"),
               helper.make_node("Transpose", [f"{base}_x3"], [f"{base}_xt"], name=f"{base}_transpose", perm=[0, 2, 1])]
        g.initializer.append(helper.make_tensor(f"{base}_shape", TensorProto.INT64, [3], [0, c_in, -1]))
        weight = f"{base}_w"
        if wdq is not None:
            new.append(helper.make_node("DequantizeLinear", [f"{base}_w", *wdq.input[1:]], [f"{base}_wd"],
                                        name=f"{base}_dequantize_w", axis=1))
            weight = f"{base}_wd"
        has_bias = len(conv.input) > 2 and conv.input[2]
        mm_out = f"{base}_mm" if has_bias else tokens
        new.append(helper.make_node("MatMul", [f"{base}_xt", weight], [mm_out], name=f"{base}_matmul"))
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, conv.input[2]], [tokens], name=f"{base}_bias"))
        # the exporter's Shape readers of the conv's output: the same shape, made from the input's
        if shape_readers:
            g.initializer.append(helper.make_tensor(f"{base}_keep", TensorProto.INT64, [4], [1, 0, 1, 1]))
            g.initializer.append(helper.make_tensor(f"{base}_cout", TensorProto.INT64, [4], [0, c_out, 0, 0]))
            new += [helper.make_node("Shape", [x], [f"{base}_xshape"], name=f"{base}_xshape"),
                    helper.make_node("Mul", [f"{base}_xshape", f"{base}_keep"], [f"{base}_kept"], name=f"{base}_kept"),
                    helper.make_node("Add", [f"{base}_kept", f"{base}_cout"], [f"{base}_yshape"], name=f"{base}_yshape")]
            for r in shape_readers:  # each becomes an Identity of that shape
                r.op_type = "Identity"
                r.input[0] = f"{base}_yshape"
        for n in layout_nodes:
            n.output[0] = f"{n.output[0]}__unused_{base}"  # the old layout ops and the conv are pruned below
        after[id(conv)] = new
        done += 1
    if not done:
        return {"proj_in_on_tokens": 0, "removed_nodes": 0}
    nodes = []
    for n in g.node:
        nodes.append(n)
        nodes += after.get(id(n), [])
    del g.node[:]
    g.node.extend(nodes)
    return {"proj_in_on_tokens": done, "removed_nodes": prune(g)}
