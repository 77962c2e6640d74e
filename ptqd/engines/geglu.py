"""GEGLU's projection as two matmuls (``split_geglu``): a graph rewrite that keeps the numerics.

A transformer block's feed-forward starts with GEGLU: one linear layer to twice the hidden width, then the
result cut in two along the channels (``proj(x).chunk(2, dim=-1)``), and ``a * gelu(gate)``. The exporter
writes the cut as two Slices (or a Split) of the projection's output; OpenVINO runs it as a VariadicSplit that
copies the whole tensor, the widest activation of the block (8x the model width in tokens x channels): 13.1 ms
of 210 executed at full size, batch 1, in f32 (``benchmarks/openvino_layouts.py``).

The rewrite gives each half its own matmul on the same (quantized) input: the weight's columns, their
per-column scales and zero points, and the bias, split in two. Every output column is computed by the same
integer dot product and the same float multiply and add as before, so the engine's values do not change; only
the copy goes. The calibration, the fake-quant model and the layer table keep the one projection.
"""

from __future__ import annotations

import numpy as np

from ptqd.engines.onnx_io import attr, dequantized_const, graph_index, prune

SHAPE_ARITHMETIC = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Mul", "Div", "Add", "Sub", "Cast",
                    "Identity", "Floor", "Ceil", "Max", "Min"}


def _const_value(name: str, inits: dict, consts: dict, values: dict):
    """The value of tensor ``name`` if it is known before run time (an initializer, a Constant node's, or a shape
    value evaluated the same at batch 1 and 2), else None."""
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    if name in consts:
        return consts[name]
    v = values.get(name)
    if v is not None and len(v) == 2 and np.array_equal(v[0], v[1]):
        return np.asarray(v[0])
    return None


def _halves(readers: list, inits: dict, consts: dict, values: dict, width: int):
    """The two cut outputs (first half, second half) when ``readers`` of the projection's output cut it into its
    two halves along the last axis (given as -1, as torch exports ``chunk(2, dim=-1)``) and only read its shape
    otherwise, else None. Every bound, axis, step and size must be known before run time."""
    cutters = [r for r in readers if r.op_type != "Shape"]
    half = width // 2
    if width % 2 or not cutters:
        return None

    def known(node, k):  # (named, value) of input k
        name = node.input[k] if len(node.input) > k else ""
        return bool(name), (_const_value(name, inits, consts, values) if name else None)

    if len(cutters) == 1 and cutters[0].op_type == "Split" and len(cutters[0].output) == 2:
        s = cutters[0]
        axis = attr(s, "axis", 0)
        named, sizes = known(s, 1)
        if not named:  # before opset 13 the sizes are an attribute; absent, the halves are equal
            sizes = list(attr(s, "split", [half, half]))
        if axis != -1 or sizes is None or [int(v) for v in np.asarray(sizes).ravel()] != [half, half]:
            return None
        return s.output[0], s.output[1]
    if len(cutters) != 2 or any(r.op_type != "Slice" for r in cutters):
        return None
    cut = {}
    for r in cutters:
        (_, starts), (_, ends), (_, axes), (named_steps, steps) = (known(r, k) for k in (1, 2, 3, 4))
        if starts is None or ends is None or axes is None or (named_steps and steps is None):
            return None  # no axes: ONNX's default is the leading axes, not the channels
        starts, ends, axes = (np.asarray(v).ravel() for v in (starts, ends, axes))
        if len(starts) != 1 or len(ends) != 1 or list(axes) != [-1] \
                or (steps is not None and list(np.asarray(steps).ravel()) != [1]):
            return None
        lo, hi = int(starts[0]), int(ends[0])
        lo, hi = (lo + width if lo < 0 else lo), (hi + width if hi < 0 else hi)
        cut[(max(0, min(lo, width)), max(0, min(hi, width)))] = r.output[0]
    if set(cut) != {(0, half), (half, width)}:
        return None
    return cut[(0, half)], cut[(half, width)]


def _shape_only(shape_readers: list, cutters: set, readers: dict, outputs: set, known: set) -> bool:
    """Whether what the ``shape_readers`` compute reaches nothing but the ``cutters`` (their bounds), so that it
    goes with them: every node on the way is shape arithmetic that reads only its own chain and constants
    (``known``)."""
    todo, seen, chain = list(shape_readers), {}, set()
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen[n.name] = n
        chain.update(n.output)
        for o in n.output:
            if o in outputs:
                return False
            for r in readers.get(o, []):
                if r.name in cutters:
                    continue
                if r.op_type not in SHAPE_ARITHMETIC:
                    return False
                todo.append(r)
    return all(not i or i in chain or i in known for n in seen.values() if n.op_type != "Shape" for i in n.input)


def split_geglu(model, values: dict | None = None) -> dict:
    """Rewrite, in place, every matmul + bias whose output is only cut into its two channel halves (GEGLU's
    projection) as two matmuls + biases, one per half (see the module doc). ``values``: the exported graph's
    shape values evaluated at batch 1 and 2 (``graph_opt.evaluated``), for Slice bounds computed at run time.
    Weights may be float or a per-column DequantizeLinear of an integer constant (with or without its zero point). Returns {"split_geglu": n}."""
    from onnx import helper, numpy_helper

    g = model.graph
    values = values or {}
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: numpy_helper.to_array(attr(n, "value"))
              for n in g.node if n.op_type == "Constant" and attr(n, "value") is not None}
    producer, readers, outputs = graph_index(g)
    known = set(inits) | set(consts)
    names = [n.name for n in g.node]
    if "" in names or len(set(names)) != len(names):  # nodes are told apart by name below
        return {"split_geglu": 0, "skipped": "nodes without unique names"}
    replace, new_inits, done = {}, [], 0
    for add in g.node:
        if add.op_type != "Add" or len(add.input) != 2 or add.output[0] in outputs:
            continue
        mm = next((producer.get(i) for i in add.input if producer.get(i) is not None
                   and producer[i].op_type == "MatMul"), None)
        bias_name = next((i for i in add.input if i in inits), None)
        if mm is None or bias_name is None or len(readers.get(mm.output[0], [])) != 1 or mm.output[0] in outputs:
            continue
        around = readers.get(add.output[0], [])
        width = int(inits[bias_name].dims[0]) if len(inits[bias_name].dims) == 1 else 0
        # the cut first, from names and shapes alone: weights are read only for a projection that is rewritten
        cut = _halves(around, inits, consts, values, width) if width else None
        if cut is None or not _shape_only([r for r in around if r.op_type == "Shape"],
                                          {r.name for r in around if r.op_type != "Shape"}, readers, outputs, known):
            continue
        bias = numpy_helper.to_array(inits[bias_name])
        w_src = mm.input[1]
        dq = dequantized_const(w_src, inits, producer)
        if w_src in inits:
            w, scale, zp, axis = numpy_helper.to_array(inits[w_src]), None, None, None
        elif dq is not None and len(readers.get(w_src, [])) == 1:
            w, scale = (numpy_helper.to_array(inits[i]) for i in dq.input[:2])
            zp = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] else None
            axis = attr(dq, "axis", 1)
            if axis not in (1, -1) or scale.shape != (w.shape[1],) or (zp is not None and zp.shape != (w.shape[1],)):
                continue
        else:
            continue
        if w.ndim != 2 or bias.shape != (w.shape[1],):
            continue
        half = w.shape[1] // 2
        nodes = []
        for h, out in enumerate(cut):
            cols = slice(h * half, (h + 1) * half)
            tag = f"{mm.name}__geglu{h}"

            def init(suffix, arr):
                new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), f"{tag}_{suffix}"))
                return f"{tag}_{suffix}"

            wname = init("w", w[:, cols])
            if scale is not None:
                dq_in = [wname, init("w_scale", scale[cols])] + ([] if zp is None else [init("w_zp", zp[cols])])
                nodes.append(helper.make_node("DequantizeLinear", dq_in, [f"{tag}_wd"], axis=1,
                                              name=f"{tag}_DequantizeLinear_w"))
                wname = f"{tag}_wd"
            nodes.append(helper.make_node("MatMul", [mm.input[0], wname], [f"{tag}_y"], name=f"{tag}_MatMul"))
            nodes.append(helper.make_node("Add", [f"{tag}_y", init("b", bias[cols])], [out], name=f"{tag}_Add"))
        replace[mm.name] = nodes
        for r in readers[add.output[0]]:  # the cut (its outputs are now the new Adds') and the Shape readers
            if r.op_type != "Shape":
                r.ClearField("output")
        done += 1
    if not done:
        return {"split_geglu": 0}
    order = []
    for n in g.node:
        if n.op_type in ("Slice", "Split") and not n.output:
            continue
        order += replace.get(n.name, [n])
    del g.node[:]
    g.node.extend(order)
    g.initializer.extend(new_inits)
    prune(g)
    return {"split_geglu": done}
