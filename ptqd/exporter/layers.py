"""The layer table: every conv, linear and attention matmul of an ONNX graph, with MACs.

One row per ONNX node of type Conv, Gemm or MatMul:

  kind       "conv" (Conv), "linear" (Gemm, or MatMul with a constant weight), "attention"
             (MatMul of two activations: Q·Kᵀ and softmax·V)
  name       ONNX node name (what the quantizer and the QDQ writer address)
  module     the torch module it came from, where the exporter recorded it
  weight / weight_shape   the constant weight's initializer and shape (None for attention)
  out_axis   the weight axis of output channels (Conv: 0; Gemm: 0 with transB else 1;
             MatMul: 1, its weight is [K, N]), the axis of per-channel weight scales
  in_shape / out_shape    activation shapes at batch 1
  macs       multiply-accumulates per forward pass at batch 1:
             Conv: |out| · (C_in/groups) · k_h · k_w = |out| · prod(W.shape[1:])
             Gemm / MatMul: |out| · K, K the contracted dimension

Shapes come from running the graph once in ONNX Runtime at batch 1 with the shape of every layer's input
and output exposed, so they are exact whatever the exporter did to reshapes. The run uses zero-filled
stand-ins for the weights (``ptqd.engines.graph_opt.evaluate``) and keeps no activation: the memory of a
2.57 B-parameter UNet's table at 1024x1024 is one forward's working set, not its weights twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("conv", "linear", "attention")
_PASS_THROUGH = ("Transpose", "Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze")


def _constant_source(name: str, inits: dict, producers: dict) -> str | None:
    """The initializer a tensor is computed from by constant-only ops, if any."""
    seen = 0
    while seen < 8:
        if name in inits:
            return name
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            return node.output[0]
        if node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
        seen += 1
    return None


def _module_of(node) -> str | None:
    """Torch module path (relative to the UNet, as in its checkpoint keys).

    From dynamo's name_scopes metadata or the TorchScript scope in the node name.
    """
    path = _scope_of(node)
    if path and path.startswith("unet."):  # the EpsModel wrapper's attribute
        path = path[len("unet."):]
    return path


def _scope_of(node) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s for s in json.loads(p.value.replace("'", '"')) if s]
            return scopes[-2] if len(scopes) > 1 else (scopes[0] if scopes else None)
    parts = [p for p in node.name.split("/") if p][:-1]
    if not parts:
        return None
    path: list[str] = []
    for comp in parts:  # "/input_blocks.1/input_blocks.1.0/in_layers/in_layers.2/Conv"
        if path and comp.startswith(path[-1] + "."):
            path[-1] = comp
        else:
            path.append(comp)
    return ".".join(path)


def build_layer_table(onnx_path: Path, feeds: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Rows for every Conv/Gemm/MatMul of the graph, with shapes observed at batch 1 (``feeds`` are accepted for
    the old signature; shapes do not depend on values)."""
    import onnx

    from ptqd.engines.graph_opt import evaluate

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    def const_shape(name: str) -> list[int] | None:
        if name in inits:
            return list(inits[name].dims)
        if name in const_nodes:
            for a in const_nodes[name].attribute:
                if a.name == "value":
                    return list(a.t.dims)
        return None

    rows, watch = [], []
    for node in g.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if not node.name:
            node.name = f"{node.op_type}_{len(rows)}"
        w_name = _constant_source(node.input[1], inits, producers)
        if node.op_type == "Conv":
            kind = "conv"
        else:
            kind = "linear" if w_name is not None else "attention"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute
                 if a.name in ("transA", "transB", "group")}
        out_axis = None
        if w_name is not None:
            out_axis = 1 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB")) else 0
        rows.append({"name": node.name, "op": node.op_type, "kind": kind, "module": _module_of(node),
                     "weight": w_name, "weight_shape": const_shape(w_name) if w_name else None, "out_axis": out_axis,
                     "input": node.input[0], "output": node.output[0], "attrs": attrs})
        watch += [node.input[0], node.output[0]]
        if kind == "attention":
            watch.append(node.input[1])

    names = list(dict.fromkeys(watch))
    ev = evaluate(model, [], names, batches=(1,), feeds=feeds)
    shapes = {n: [int(d) for d in ev[f"{n}__shape"][0]] for n in names}

    totals = {k: 0 for k in KINDS}
    for r in rows:
        out = shapes[r["output"]]
        a = shapes[r["input"]]
        r["in_shape"], r["out_shape"] = a, out
        if r["op"] == "Conv":
            macs = int(np.prod(out)) * int(np.prod(r["weight_shape"][1:]))
        elif r["op"] == "Gemm":
            k = a[0] if r["attrs"].get("transA") else a[1]
            macs = int(np.prod(out)) * int(k)
        else:
            macs = int(np.prod(out)) * int(a[-1])
        r["macs"] = macs
        totals[r["kind"]] += macs
        del r["input"], r["output"]
    # Ops with MACs this table does not count (none in the supported UNets); listed so a gap is visible.
    uncounted = sorted({n.op_type for n in g.node if n.op_type in ("Einsum", "ConvTranspose", "QLinearConv")})
    return {
        "batch": 1,
        "uncounted_ops": uncounted,
        "macs_per_forward": sum(totals.values()),
        "macs_by_kind": totals,
        "layer_count": {k: sum(r["kind"] == k for r in rows) for k in KINDS},
        "layers": rows,
    }
