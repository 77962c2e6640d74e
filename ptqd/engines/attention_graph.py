"""Attention cores in an exported UNet graph, found and rewritten for ONNX Runtime and OpenVINO (used by
:mod:`ptqd.engines.graph_opt`, which evaluates the shapes these functions read).

:func:`find_attention` proves, from the tensors' shapes at batch 1, that a Softmax sits in the standard head split
(``[B, L, H*d] -> [B*H, L, d]`` for q, k, v and back). :func:`rewrite_attention` then writes each core in the form
that runs fastest for what it is: one ``com.microsoft.MultiHeadAttention`` node for several heads, the bare
matmuls for one head, v itself for one key.
"""

from __future__ import annotations

import numpy as np

from ptqd.engines.onnx_io import attr, dequantized_const, graph_index, prune


def _perm(n) -> list[int]:
    return list(attr(n, "perm", []))


def _scalar(g, consts: dict, name: str) -> float | None:
    v = consts.get(name)
    return None if v is None or v.size != 1 else float(v.reshape(()))


def _constant_values(g) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {i.name: numpy_helper.to_array(i) for i in g.initializer if int(np.prod(i.dims) if i.dims else 1) <= 16}
    for n in g.node:
        if n.op_type == "Constant" and attr(n, "value") is not None:
            out[n.output[0]] = numpy_helper.to_array(attr(n, "value"))
    return out


PER_TOKEN_BINARY = ("Add", "Sub", "Mul", "Div")


def one_token_chain(g, out: str) -> list:
    """The nodes after a one-key attention's output ``out`` that compute each token on its own with constants
    alone, in order: the output projection's quantizer (scalar scale; a 4-bit one's Clip), its MatMul on a constant [C, C'] weight,
    its bias Add, a scalar rescale. Broadcasting their result over the tokens equals broadcasting ``out`` first
    (every token of ``out`` is the same v), so they can run on one token. Stops at the first other reader (the
    residual Add), at a tensor with several readers, a Shape reader or a graph output."""
    inits = {i.name: tuple(i.dims) for i in g.initializer}
    producer, readers, outputs = graph_index(g)

    def const_shape(t: str):
        """The shape of a constant tensor: an initializer, or the DequantizeLinear of initializers (a weight)."""
        if t in inits:
            return inits[t]
        d = dequantized_const(t, inits, producer)
        return None if d is None else inits[d.input[0]]

    def per_token(n, cur: str) -> bool:
        ins = list(n.input)
        if ins.count(cur) != 1 or len(n.output) != 1 or ins[0] != cur and n.op_type not in ("Add", "Mul"):
            return False  # (a commutative op may read the tensor second)
        others = [const_shape(x) for x in n.input if x and x != cur]
        if any(o is None for o in others):
            return False
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Clip"):
            return all(int(np.prod(o)) == 1 for o in others)  # per-tensor (Clip: a 4-bit input's range)
        if n.op_type == "MatMul":
            return n.input[0] == cur and len(others[0]) == 2
        if n.op_type in PER_TOKEN_BINARY:  # a scalar or a per-channel vector on the last axis
            return all(len(o) <= 1 or all(d == 1 for d in o[:-1]) and len(o) <= 3 for o in others)
        return False

    chain, cur = [], out
    while cur not in outputs:
        r = readers.get(cur, [])
        if len(r) != 1 or not per_token(r[0], cur):
            break
        chain.append(r[0])
        cur = r[0].output[0]
    return chain


def find_attention(g, shapes: dict[str, np.ndarray]) -> list[dict]:
    """Attention cores of ``g`` in the standard decomposed layout. ``shapes``: tensor name -> its shape at
    batch 1 (for every Reshape, Transpose, MatMul output and every MatMul input). Each match: q, k, v (the
    [B, L, H*d] sources), out (the [B, L, H*d] result), heads, scale, and the nodes it replaces."""
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    consts = _constant_values(g)

    def back(name: str, ops: list[str]):
        """Walk producers through ``ops`` (last first); returns (nodes, source tensor) or None."""
        nodes = []
        for op in reversed(ops):
            n = producer.get(name)
            if n is None or n.op_type != op or len(readers.get(n.output[0], [])) != 1:
                return None
            nodes.append(n)
            name = n.input[0]
        return nodes, name

    def heads_of(src: str, split: str, merged: str) -> int | None:
        """Heads when ``src`` [1, L, C] -> ``split`` [1, L, H, d] -> (perm 0213) -> ``merged`` [H, L, d]."""
        s, sp, mg = (shapes.get(x) for x in (src, split, merged))
        if s is None or sp is None or mg is None or len(s) != 3 or len(sp) != 4 or len(mg) != 3:
            return None
        if s[0] != 1 or sp[0] != 1 or sp[1] != s[1] or sp[2] * sp[3] != s[2] or list(mg) != [sp[2], sp[1], sp[3]]:
            return None
        return int(sp[2])

    found = []
    for sm in g.node:
        if sm.op_type != "Softmax":
            continue
        axis = attr(sm, "axis", -1)
        if axis not in (-1, 2):
            continue
        scaled = producer.get(sm.input[0])
        if scaled is None or scaled.op_type not in ("Mul", "Div"):
            continue
        c = _scalar(g, consts, scaled.input[1])
        if c is None or c == 0:
            continue
        scale = c if scaled.op_type == "Mul" else 1.0 / c
        qk = producer.get(scaled.input[0])
        av = readers.get(sm.output[0], [])
        if qk is None or qk.op_type != "MatMul" or len(av) != 1 or av[0].op_type != "MatMul" or av[0].input[0] != sm.output[0]:
            continue
        av = av[0]
        q = back(qk.input[0], ["Reshape", "Transpose", "Reshape"])
        k = back(qk.input[1], ["Reshape", "Transpose", "Reshape", "Transpose"])
        v = back(av.input[1], ["Reshape", "Transpose", "Reshape"])
        if not (q and k and v):
            continue
        # q: Reshape(split) -> Transpose(0213) -> Reshape(merge); the walk lists nodes last first
        (q_merge, q_tr, q_split), q_src = q
        (k_t, k_merge, k_tr, k_split), k_src = k
        (v_merge, v_tr, v_split), v_src = v
        if any(_perm(t) != [0, 2, 1, 3] for t in (q_tr, k_tr, v_tr)) or _perm(k_t) != [0, 2, 1]:
            continue
        h = {heads_of(q_src, q_split.output[0], q_merge.output[0]), heads_of(k_src, k_split.output[0], k_merge.output[0]),
             heads_of(v_src, v_split.output[0], v_merge.output[0])}
        if len(h) != 1 or None in h:
            continue
        heads = h.pop()
        # out: MatMul [H, L, d] -> Reshape [1, H, L, d] -> Transpose(0213) -> Reshape [1, L, H*d]
        tail, cur = [], av.output[0]
        for op in ("Reshape", "Transpose", "Reshape"):
            r = readers.get(cur, [])
            if len(r) != 1 or r[0].op_type != op or r[0].input[0] != cur:
                break
            tail.append(r[0])
            cur = r[0].output[0]
        if len(tail) != 3 or _perm(tail[1]) != [0, 2, 1, 3]:
            continue
        so, qs = shapes.get(tail[2].output[0]), shapes.get(q_src)
        if so is None or qs is None or list(so) != list(qs) or list(shapes.get(tail[0].output[0], [])) != \
                [1, heads, qs[1], qs[2] // heads]:
            continue
        if shapes.get(v_src) is None or shapes[v_src][2] != qs[2]:
            continue  # MultiHeadAttention here: v's width equal to q's
        d = int(qs[2]) // heads
        ks = shapes.get(k_src)
        found.append({"q": q_src, "k": k_src, "v": v_src, "out": tail[2].output[0], "heads": heads, "scale": scale,
                      "tokens": int(qs[1]), "keys": int(ks[1]) if ks is not None and len(ks) == 3 else None,
                      "default_scale": abs(scale - d ** -0.5) <= 1e-6 * d ** -0.5, "name": sm.name,
                      "nodes": [n.name or n.output[0] for n in q[0] + k[0] + v[0] + [qk, scaled, sm, av] + tail]})
    return found


def rewrite_attention(model, shapes: dict[str, np.ndarray], fuse_all: bool = False,
                      one_key_only: bool = False, one_token: str = "all") -> dict:
    """Rewrite, in place, each attention core :func:`find_attention` proves: one com.microsoft
    MultiHeadAttention node where it has several heads, and the bare ``Softmax(q·kᵀ·scale)·v`` on the [B, L, C]
    tensors where it has one. Returns counts.

    A single head is cin256-v2's case (``num_heads: 1``). ONNX Runtime's CPU MultiHeadAttention kernel spreads
    its work over batch x heads, so one head at batch 1 runs on one thread; the head split's Reshape/Transpose
    chain is then pure copying (``H = 1``), and without it ONNX Runtime fuses kᵀ into one multi-threaded matmul.
    At the full-size model's shapes (L 1024, C 384; 2 threads) that is 0.67x MultiHeadAttention's time at batch 1
    and 0.90x at batch 2 (``benchmarks/attention_fused.py --shapes cin256``). The bare form runs the same ops in the
    same order as the exported graph, so its numbers are those of the decomposed graph.

    A core with one key (a class-conditional model's cross-attention on its one class token: cin256-v2's
    ``attn2``, half its attention blocks) computes softmax over one value, which is exactly 1: its output is v,
    broadcast over the tokens (``Expand``). Its q and k projections then have no reader and are pruned, with
    their quantizers (full size: 1.5 GMAC of int8 matmuls per forward; their node names are returned under
    ``pruned_layers``). The output projection after it (:func:`one_token_chain`: its quantizer, matmul and bias)
    then runs on the one token, and the Expand follows it (full size: about as many MACs again;
    ``one_token_nodes`` counts the nodes moved; ``one_token="none"`` leaves them). Same numbers for finite inputs (the runners refuse others),
    up to the matmul kernels' summation order at one row against many.

    ``fuse_all=True`` fuses every core into MultiHeadAttention (``benchmarks/attention_fusion_engine.py``
    times both); ``one_key_only=True`` rewrites only the one-key cores (OpenVINO:
    ``graph_opt.optimize_for_openvino``)."""
    from onnx import TensorProto, helper

    g = model.graph
    matches = find_attention(g, shapes)
    for m in matches:
        one_key = m["keys"] == 1
        m["form"] = "mha" if fuse_all or (m["heads"] > 1 and not one_key) else "one_key" if one_key else "bare"
    if one_key_only:
        matches = [m for m in matches if m["form"] == "one_key"]
    if not matches:
        return {"fused_attention": 0, "single_head_attention": 0, "single_key_attention": 0}
    producer = {o: n for n in g.node for o in n.output}
    drop = {x for m in matches for x in m["nodes"]}
    at = {m["name"]: m for m in matches}
    expand_after, one_token_nodes = {}, 0  # id(last node of a one-token chain) -> the Expand that follows it
    for m in matches:
        if m["form"] == "one_key":
            chain = [] if one_token == "none" else one_token_chain(g, m["out"])
            m["chain"] = bool(chain)
            if chain:  # the chain reads v itself; its result is broadcast over the tokens
                p = f"{m['name']}_single_head"
                first, last = chain[0], chain[-1]
                first.input[list(first.input).index(m["out"])] = m["v"]
                g.initializer.append(helper.make_tensor(f"{p}_shape", TensorProto.INT64, [3], [1, m["tokens"], 1]))
                expand_after[id(last)] = helper.make_node("Expand", [f"{p}_one_token", f"{p}_shape"],
                                                          [last.output[0]], name=f"{p}_expand")
                last.output[0] = f"{p}_one_token"
                one_token_nodes += len(chain)
    nodes = []
    for n in g.node:
        if n.op_type == "Softmax" and n.name in at:
            m = at[n.name]
            p = f"{n.name}_single_head"
            if m["form"] == "one_key" and m["chain"]:
                pass  # the Expand follows the chain (expand_after)
            elif m["form"] == "one_key":
                # one key (a class-conditional model's cross-attention): its softmax is exactly 1, out = v
                g.initializer.append(helper.make_tensor(f"{p}_shape", TensorProto.INT64, [3],
                                                        [1, m["tokens"], int(shapes[m["v"]][2])]))
                nodes.append(helper.make_node("Expand", [m["v"], f"{p}_shape"], [m["out"]], name=f"{p}_expand"))
            elif m["form"] == "mha":
                kw = {} if m["default_scale"] else {"scale": float(m["scale"])}
                nodes.append(helper.make_node("MultiHeadAttention", [m["q"], m["k"], m["v"]], [m["out"]],
                                              name=f"{n.name}_MultiHeadAttention", domain="com.microsoft",
                                              num_heads=int(m["heads"]), **kw))
            else:
                scaled = producer[n.input[0]]  # Mul or Div by the matched scalar, kept as it was
                nodes += [helper.make_node("Transpose", [m["k"]], [f"{p}_kT"], name=f"{p}_kT", perm=[0, 2, 1]),
                          helper.make_node("MatMul", [m["q"], f"{p}_kT"], [f"{p}_qk"], name=f"{p}_qk"),
                          helper.make_node(scaled.op_type, [f"{p}_qk", scaled.input[1]], [f"{p}_scaled"],
                                           name=f"{p}_scale"),
                          helper.make_node("Softmax", [f"{p}_scaled"], [f"{p}_p"], name=f"{p}_softmax", axis=-1),
                          helper.make_node("MatMul", [f"{p}_p", m["v"]], [m["out"]], name=f"{p}_av")]
        elif (n.name or n.output[0]) not in drop:
            nodes.append(n)
            if id(n) in expand_after:
                nodes.append(expand_after[id(n)])
    del g.node[:]
    g.node.extend(nodes)
    forms = [m["form"] for m in matches]
    if "mha" in forms and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    layers = {n.name for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm")}
    removed = prune(g)
    pruned = sorted(layers - {n.name for n in g.node})
    return {"fused_attention": forms.count("mha"), "single_head_attention": forms.count("bare"),
            "single_key_attention": forms.count("one_key"), "one_token_nodes": one_token_nodes,
            "removed_nodes": removed, "pruned_layers": pruned}


def attention_candidates(g) -> list[str]:
    """Tensors whose batch-1 shapes :func:`find_attention` reads."""
    names = set()
    for n in g.node:
        if n.op_type in ("Reshape", "Transpose"):
            names.update(n.output)
            names.add(n.input[0])
        if n.op_type == "MatMul":
            names.update(i for i in n.input if i)
            names.update(n.output)
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return sorted(x for x in names if x not in consts)
