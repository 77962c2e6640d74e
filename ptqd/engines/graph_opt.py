"""Graph rewrites that make ptqd's ONNX Runtime engines faster than the exported graph, without changing
what they compute.

The exporter keeps the batch axis dynamic, so torch's tracer writes every ``reshape(b, ...)`` as shape
arithmetic at run time: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``, about 1,100 tiny nodes in
a 47 M-parameter UNet that ONNX Runtime runs one by one on every forward (6.3 ms of a 45 ms forward at
batch 2 on a 2-core Xeon; ``benchmarks/profile_ops.py``). And attention's core comes out as Reshape,
Transpose, MatMul, Mul, Softmax, MatMul, Transpose, Reshape, where ONNX Runtime has one fused CPU kernel
(``com.microsoft.MultiHeadAttention``) that runs it 1.2-1.4x faster (``benchmarks/attention_fused.py``).

* :func:`fold_shapes` evaluates every run-time shape value of the graph at batch 1 and batch 2 (an ONNX
  Runtime run of the graph on zero-filled stand-ins for its weights: shapes never depend on weight
  values). A value that is the same at both batches becomes a constant; a Reshape target that differs in
  one axis only, in proportion to the batch, becomes a constant with -1 there. The shape arithmetic then
  has no reader and is dropped. Only for graphs whose one dynamic axis is the batch.
* :func:`fuse_attention` replaces each attention core whose layout it can prove, from the same evaluated
  shapes, to be the standard head split (``[B, L, H*d] -> [B*H, L, d]`` for q, k, v and back) by one
  ``MultiHeadAttention`` node (ONNX Runtime only: OpenVINO and TensorRT read standard ONNX); with one head
  (cin256-v2) by the bare matmuls on ``[B, L, C]``, which ONNX Runtime runs faster than its fused kernel there.

Both keep the float numerics: the attention kernel sums in another order (within 5e-6 of the decomposed
graph on unit-scale inputs), far inside the engines' validation tolerance against the fake-quant model.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

import numpy as np

from ptqd.engines.attention_graph import attention_candidates, rewrite_attention
from ptqd.engines.onnx_io import prune

# ops that compute shape values from shape values (and small constants)
SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Mul", "Div", "Add", "Sub", "Cast",
             "Equal", "Where", "Identity", "Floor", "Ceil", "Max", "Min", "Range", "Size", "Mod"}
STANDIN_MIN = 1024  # initializers with at least this many elements are weights: zero-filled stand-ins at evaluation


def dynamic_axes(model) -> dict[str, list[int]]:
    """Per graph input, the axes without a fixed size."""
    return {i.name: [k for k, d in enumerate(i.type.tensor_type.shape.dim) if not d.HasField("dim_value")]
            for i in model.graph.input}


def batch_only(model) -> bool:
    """Whether the graph's only dynamic axis is axis 0 of every input (ptqd's UNet export)."""
    return all(axes == [0] for axes in dynamic_axes(model).values())


def _const_names(g) -> set[str]:
    return {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}


def shape_values(g) -> set[str]:
    """Tensors of ``g`` that carry shape arithmetic: outputs of Shape, and of SHAPE_OPS nodes whose every input
    is a constant or such a tensor."""
    consts, out = _const_names(g), set()
    for n in g.node:  # graph order is topological
        ins = [i for i in n.input if i]
        if n.op_type == "Shape" or (n.op_type in SHAPE_OPS and ins and all(i in out or i in consts for i in ins)
                                    and any(i in out for i in ins)):
            out.update(n.output)
    return out


def shape_inputs(g) -> list[tuple[int, int, str]]:
    """(node index, input index, tensor) for each input of a node outside the shape arithmetic that reads a
    shape value: Reshape targets, Slice bounds, Expand shapes, Resize sizes and the like."""
    sv = shape_values(g)
    return [(k, j, name) for k, n in enumerate(g.node) if not (set(n.output) & sv)
            for j, name in enumerate(n.input) if name in sv]


def _standin_model(model, extra_outputs: list[str], shapes_of: list[str]):
    """A copy of ``model`` (loaded without external data) whose large initializers are ConstantOfShape nodes
    and whose outputs are ``extra_outputs`` (as they are) and the shapes of ``shapes_of``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    # each stand-in is made right before its first reader: its shape depends (by a zero) on that reader's first
    # activation input, so ONNX Runtime does not run every ConstantOfShape up front and hold all the weights
    first_reader: dict[str, str] = {}
    for n in g.node:
        act = next((i for i in n.input if i and i not in inits), None)
        for i in n.input:
            if i in inits and i not in first_reader and act is not None:
                first_reader[i] = act
    keep, standins = [], {}
    zero = numpy_helper.from_array(np.zeros(1, np.int64), "__standin_zero")
    first = numpy_helper.from_array(np.zeros(1, np.int64), "__standin_first")
    for t in g.initializer:
        n = int(np.prod(t.dims)) if len(t.dims) else 1
        if n >= STANDIN_MIN or t.data_location == TensorProto.EXTERNAL:
            shp = numpy_helper.from_array(np.array(list(t.dims), np.int64), f"{t.name}__standin_shape")
            keep.append(shp)
            made, src = [], shp.name
            act = first_reader.get(t.name)
            if act is not None:
                made = [helper.make_node("Shape", [act], [f"{t.name}__s"]),
                        helper.make_node("Gather", [f"{t.name}__s", first.name], [f"{t.name}__g"], axis=0),
                        helper.make_node("Mul", [f"{t.name}__g", zero.name], [f"{t.name}__z"]),
                        helper.make_node("Add", [shp.name, f"{t.name}__z"], [f"{t.name}__shape"])]
                src = f"{t.name}__shape"
            made.append(helper.make_node("ConstantOfShape", [src], [t.name],
                                         value=helper.make_tensor("v", t.data_type, [1], [0])))
            standins.setdefault(act, []).extend(made)
        else:
            keep.append(t)
    del g.initializer[:]
    g.initializer.extend(keep + [zero, first])
    nodes = list(standins.pop(None, []))
    produced = {i.name for i in g.input} | {t.name for t in keep}
    for name in list(standins):  # stand-ins reading a graph input or an initializer go first
        if name in produced:
            nodes += standins.pop(name)
    # each watched tensor's Shape right after the node that makes it: at the end, they would keep every watched
    # activation alive to the end of the run (a 1024x1024 SDXL forward's would not fit)
    outs = [f"{name}__shape" for name in shapes_of]
    shape_nodes = {name: helper.make_node("Shape", [name], [f"{name}__shape"]) for name in shapes_of}
    nodes += [shape_nodes.pop(name) for name in list(shape_nodes) if name in produced]
    for n in g.node:
        nodes.append(n)
        for o in n.output:
            nodes += standins.pop(o, [])
            if o in shape_nodes:
                nodes.append(shape_nodes.pop(o))
    for rest in standins.values():
        nodes += rest
    nodes += list(shape_nodes.values())
    del g.node[:]
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(helper.make_empty_tensor_value_info(o) for o in list(extra_outputs) + outs)
    return m


def _inputs_at(model, batch: int) -> dict[str, np.ndarray]:
    from onnx import helper

    feeds = {}
    for i in model.graph.input:
        tt = i.type.tensor_type
        shape = [batch if not d.HasField("dim_value") else d.dim_value for d in tt.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[i.name] = (np.full(shape, 500, dtype) if np.issubdtype(dtype, np.integer) or i.name == "t"
                         else np.random.RandomState(0).standard_normal(shape).astype(dtype))
    return feeds


@contextlib.contextmanager
def large_allocations_returned():
    """While active, glibc serves every allocation over 128 KiB by mmap, so that freed tensors go back to the
    system. Its default raises that threshold as large blocks are freed (up to 32 MiB), and an evaluation that
    makes and frees each weight of a 2.57 B-parameter UNet in turn then keeps them all in fragmented heap: 23 GB
    instead of 1.3 (SDXL at 1024x1024). Afterwards the threshold stays at 32 MiB, the default's ceiling."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        yield
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 17)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_threshold, 32 << 20)


def evaluate(model, values: list[str], shapes_of: list[str], batches=(1, 2),
             feeds: dict[str, np.ndarray] | None = None) -> dict[str, list[np.ndarray]]:
    """The values of ``values`` and the shapes of ``shapes_of`` at each batch size, from ONNX Runtime runs of
    ``model`` with zero-filled stand-ins for its weights (no optimization, so every tensor keeps its name).
    Keys: tensor names, and ``NAME__shape`` for the shapes. ``feeds``: the inputs to use (one batch size)
    instead of seeded ones."""
    import onnxruntime as ort

    m = _standin_model(model, values, shapes_of)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.enable_cpu_mem_arena = False  # every buffer back to the system when the session goes: a build's peak
    so.enable_mem_pattern = False
    # nodes in the graph's order (each Shape right after its tensor): the default order may run them last and
    # keep every watched activation alive to the end
    so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    with large_allocations_returned():
        for b in batches:
            for n, v in zip(names, sess.run(names, feeds if feeds is not None else _inputs_at(model, b))):
                out[n].append(np.asarray(v))
    return out


def fold_shapes(model, evaluated: dict[str, list[np.ndarray]] | None = None) -> dict:
    """Replace, in place, run-time shape values read outside the shape arithmetic by constants (see the module
    doc), then drop what no longer has a reader. Returns counts."""
    from onnx import numpy_helper

    g = model.graph
    if not batch_only(model):
        return {"folded": 0, "skipped": "a dynamic axis other than the batch"}
    reads = shape_inputs(g)
    names = sorted({name for _, _, name in reads})
    if not names:
        return {"folded": 0, "removed_nodes": 0}
    ev = evaluated if evaluated is not None else evaluate(model, names, [])
    folded, new_inits, made = 0, [], {}
    for k, j, name in reads:
        node = g.node[k]
        v1, v2 = ev[name]
        if v1.shape != v2.shape:
            continue
        if np.array_equal(v1, v2):
            value = v1
        elif node.op_type == "Reshape" and j == 1 and v1.ndim == 1 and (v1 != v2).sum() == 1 and (v1 > 0).all() \
                and int(v2[v1 != v2][0]) == 2 * int(v1[v1 != v2][0]):
            value = v1.copy()
            value[v1 != v2] = -1  # the batch-proportional axis: inferred from the input's size at run time
        else:
            continue
        key = (name, value.tobytes())
        if key not in made:
            made[key] = f"{name}__folded{len(made)}"
            new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), made[key]))
        node.input[j] = made[key]
        folded += 1
    g.initializer.extend(new_inits)
    removed = prune(g)
    return {"folded": folded, "removed_nodes": removed}


def fuse_attention(model, shapes: dict[str, np.ndarray] | None = None, fuse_all: bool = False,
                   one_key_only: bool = False, one_token: str = "all") -> dict:
    """:func:`ptqd.engines.attention_graph.rewrite_attention` on ``model`` in place, with its attention shapes
    evaluated here when not given. Returns counts."""
    return rewrite_attention(model, attention_shapes(model) if shapes is None else shapes, fuse_all=fuse_all,
                             one_key_only=one_key_only, one_token=one_token)


def attention_shapes(model) -> dict[str, np.ndarray]:
    names = attention_candidates(model.graph)
    ev = evaluate(model, [], names, batches=(1,))
    return {n: ev[f"{n}__shape"][0] for n in names}


@functools.lru_cache(maxsize=4)
def _evaluated(fp_onnx: str, mtime: float, size: int) -> tuple[dict, dict]:
    """Shape values and attention shapes of the exported graph, once per build (every precision's QDQ graph
    has the exported graph's shape arithmetic and attention unchanged)."""
    import onnx

    model = onnx.load(fp_onnx, load_external_data=False)
    reads = sorted({name for _, _, name in shape_inputs(model.graph)})
    cands = attention_candidates(model.graph)
    ev = evaluate(model, reads, cands)
    return {n: ev[n] for n in reads}, {n: ev[f"{n}__shape"][0] for n in cands}


def prepare(fp_onnx: str | os.PathLike) -> None:
    """Evaluate the exported graph's shapes now (cached for :func:`optimize_for_ort`): before a build holds a QDQ
    graph and the model, so that the evaluation's memory does not add to theirs (full-size cin256-v2: 1.4 GiB)."""
    p = Path(fp_onnx)
    import onnx

    if batch_only(onnx.load(str(p), load_external_data=False)):
        st = p.stat()
        _evaluated(str(p), st.st_mtime, st.st_size)


def evaluated(fp_onnx: str | os.PathLike) -> tuple[dict, dict]:
    """(shape values, attention shapes) of the exported graph at ``fp_onnx``: evaluated once per file version
    (:func:`prepare` does it before a build holds its models)."""
    p = Path(fp_onnx)
    st = p.stat()
    return _evaluated(str(p), st.st_mtime, st.st_size)


def without_weight_zero_points(model) -> int:
    """Leave out, in place, the zero-point input of every DequantizeLinear of an integer weight (2-D or more) whose
    zero points are all 0: ONNX's default, so the values are the same, and OpenVINO's frontend then writes no
    Subtract of zeros into the weight's dequantization. Returns how many."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    done = 0
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[0] in inits \
                and len(inits[n.input[0]].dims) >= 2 and n.input[2] in inits \
                and not numpy_helper.to_array(inits[n.input[2]]).any():
            del n.input[2]
            done += 1
    prune(model.graph)
    return done


def optimize_for_openvino(model, fp_onnx: str | os.PathLike, proj_in_tokens: bool = True,
                          one_token: str = "all") -> dict:
    """On ``model`` (an OpenVINO QDQ graph written from ``fp_onnx``), in place: the one-key attention rewrite of
    :func:`fuse_attention`, GEGLU's projection as two matmuls (:func:`ptqd.engines.geglu.split_geglu`), each
    transformer's 1x1 proj_in conv as a matmul on its tokens (:func:`ptqd.engines.token_proj.proj_in_on_tokens`;
    ``proj_in_tokens=False`` leaves it; ``one_token``: see :func:`fuse_attention`) and the weights' zero zero points left out
    (:func:`without_weight_zero_points`). OpenVINO runs the rest of attention, and the shape arithmetic, itself.
    None changes a value."""
    from ptqd.engines.geglu import split_geglu
    from ptqd.engines.token_proj import proj_in_on_tokens

    zp = {"weight_zero_points_dropped": without_weight_zero_points(model)}
    if not batch_only(model):
        return {"single_key_attention": 0, "split_geglu": 0, **zp, "skipped": "a dynamic axis other than the batch"}
    values, shapes = evaluated(fp_onnx)
    rec = fuse_attention(model, shapes, one_key_only=True, one_token=one_token)
    tok = proj_in_on_tokens(model, shapes) if proj_in_tokens else {"proj_in_on_tokens": 0, "removed_nodes": 0}
    return {"single_key_attention": rec["single_key_attention"], "one_token_nodes": rec.get("one_token_nodes", 0),
            **split_geglu(model, values), "proj_in_on_tokens": tok["proj_in_on_tokens"], **zp,
            "removed_nodes": rec.get("removed_nodes", 0) + tok["removed_nodes"],
            "pruned_layers": rec.get("pruned_layers", [])}


def optimize_for_ort(model, fp_onnx: str | os.PathLike) -> dict:
    """Both rewrites on ``model`` (a QDQ graph written from ``fp_onnx``), in place. Returns what was done."""
    if not batch_only(model):
        return {"folded": 0, "fused_attention": 0, "skipped": "a dynamic axis other than the batch"}
    values, shapes = evaluated(fp_onnx)
    rec = fold_shapes(model, values)
    att = fuse_attention(model, shapes)
    return {"folded_shape_values": rec["folded"], "fused_attention": att["fused_attention"],
            "single_head_attention": att["single_head_attention"], "single_key_attention": att["single_key_attention"],
            "one_token_nodes": att.get("one_token_nodes", 0), "removed_nodes": rec.get("removed_nodes", 0) + att.get("removed_nodes", 0),
            "pruned_layers": att.get("pruned_layers", [])}
