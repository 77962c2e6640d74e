"""CPU conformance linter: is a QDQ graph one that TensorRT builds the way its name says?

TensorRT's explicit quantization reads the precision of every layer from the Q/DQ nodes of the ONNX
graph; a graph that breaks one of its rules fails at parse time on the GPU machine (asymmetric zero
points, non-constant scales), or worse, builds an engine that silently runs some layers in float
(Q/DQ where TensorRT cannot fuse them). These checks need only onnx and numpy, so a bundle can be
checked right after calibration, on the machine that made it, before it ever meets a GPU.

Rules (ids are what ``ptqd lint`` prints; each has a test that breaks a graph on purpose):

  opset        default-domain opset TensorRT's parser reads (9..24 for TensorRT 10.15), and new
               enough for the Q/DQ features used: 13 per-axis scales, 19 FP16/BF16 scales, 21 INT4 and
               block scales
  quant-type   Q/DQ to INT8 (or FP8) or INT4 (weights only); not UINT8 (asymmetric,
               refused on GPUs), INT16 or INT32 (a DequantizeLinear of an int32 bias is an ORT idiom)
  zero-point   zero points are constants and all zero: TensorRT quantization is symmetric
  scale        scales are build-time constants (initializer or Constant), finite and > 0, in
               float32, float16 or bfloat16
  scale-shape  activation scales per tensor (one element); weight scales per tensor, per channel
               (1-D, as long as the quantized axis) or, for INT4 weights, 2-D blocks of 64 or 128
  weight-axis  per-channel weight scales on the consumer's output-channel axis (Conv 0, MatMul
               weight [K, N] 1, Gemm B 0 with transB else 1; ConvTranspose 0, the axis TensorRT's
               kernels quantize); INT4 blocks along the reduction axis K
  int4         INT4 only as the weight-only, block-quantized DequantizeLinear of a constant MatMul or
               Gemm weight with an even last dimension, whose activation is not quantized; no INT4
               activations, no INT4 convolutions
  placement    Q/DQ only where TensorRT fuses them: a QuantizeLinear feeds DequantizeLinear nodes
               with its own scale and zero point; a DequantizeLinear feeds the data or weight input
               of Conv / ConvTranspose / MatMul / Gemm; an activation's DequantizeLinear comes from
               a QuantizeLinear
  output       no Q/DQ produces a network output (through Cast / Identity)

The rules come from TensorRT's documentation (Working with Quantized Types; the IQuantizeLayer and
IDequantizeLayer references) and from what its ONNX parser asserts (onnx-tensorrt's
QuantDequantLinearHelper: zero points all zero, scales positive, static-shaped, per-axis only with
a 1-D scale as long as the axis, one blocked axis, INT4 only with an even last dimension).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.engines.onnx_io import load_model
from ptqd.errors import UserError

TARGETS = ("tensorrt",)

RULES: dict[str, str] = {
    "opset": "default-domain opset TensorRT reads, new enough for the Q/DQ features used "
             "(13 per-axis, 19 FP16 scales, 21 INT4 and blocks)",
    "quant-type": "Q/DQ to INT8 (or FP8), or INT4 for weights; no UINT8, INT16, INT32",
    "zero-point": "zero points constant and all zero (symmetric quantization)",
    "scale": "scales are constants, finite and > 0, float32/float16/bfloat16",
    "scale-shape": "activations per tensor; weights per tensor, per channel, or INT4 2-D blocks of 64/128",
    "weight-axis": "per-channel weight scales on the output-channel axis; INT4 blocks along K",
    "int4": "INT4 only as weight-only block-quantized MatMul/Gemm weights with an even last dimension",
    "placement": "Q feeds DQ with the same scale and zero point; DQ feeds Conv/ConvTranspose/MatMul/Gemm inputs",
    "output": "no Q/DQ on a network output",
}

# TensorRT 10.15 parses opsets 9..24 (onnx-tensorrt docs/operators.md); lint_qdq(max_opset=) for others.
TRT_MIN_OPSET, TRT_MAX_OPSET = 9, 24
INT4_BLOCK_SIZES = (64, 128)  # TensorRT's supported INT4 block sizes
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
LINEAR_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
PASS_THROUGH = ("Cast", "Identity")


@dataclass(frozen=True)
class Finding:
    """One broken rule: ``rule`` is a key of :data:`RULES`, ``node`` the ONNX node (or tensor) name."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "node": self.node, "message": self.message}


class _Graph:
    """Index of one ONNX graph: producers, consumers, constants (initializer, Constant, Identity of one)."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[tuple[Any, int]]] = {}
        for n in self.nodes:
            for i, name in enumerate(n.input):
                if name:
                    self.consumers.setdefault(name, []).append((n, i))
        self.outputs = {o.name for o in g.output}
        self._const_protos = {i.name: i for i in g.initializer}
        self._to_array = numpy_helper.to_array
        self._cache: dict[str, np.ndarray | None] = {}

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when it is computed at run time."""
        if name in self._cache:
            return self._cache[name]
        value = None
        if name in self._const_protos:
            value = self._to_array(self._const_protos[name])
        elif name in self.producer:
            n = self.producer[name]
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        value = self._to_array(a.t)
                    elif a.name in ("value_float", "value_int"):
                        value = np.array(a.f if a.name == "value_float" else a.i)
                    elif a.name in ("value_floats", "value_ints"):
                        value = np.array(list(a.floats) if a.name == "value_floats" else list(a.ints))
            elif n.op_type == "Identity":
                value = self.const(n.input[0])
        self._cache[name] = value
        return value

    def elem_type(self, name: str) -> int | None:
        """ONNX element type of a constant (initializer or Constant node), else None."""
        if name in self._const_protos:
            return self._const_protos[name].data_type
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    return a.t.data_type
        if n is not None and n.op_type == "Identity":
            return self.elem_type(n.input[0])
        return None

    def shape(self, name: str) -> tuple[int, ...] | None:
        v = self.const(name)
        return None if v is None else tuple(v.shape)


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _type_name(t: int | None) -> str:
    from onnx import TensorProto

    return "unknown" if t is None else TensorProto.DataType.Name(t)


def _default_opset(model) -> int | None:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def _load(path_or_model):

    if isinstance(path_or_model, (str, os.PathLike)):
        p = Path(path_or_model)
        if not p.is_file():
            raise UserError(f"{p}: no such ONNX file")
        return load_model(p)
    return path_or_model


def _expected_weight_axis(consumer, input_index: int, rank: int) -> int | None:
    """The output-channel axis of a constant weight as ``consumer`` reads it (None: not a weight input)."""
    op = consumer.op_type
    if op == "Conv" and input_index == 1:
        return 0
    if op == "ConvTranspose" and input_index == 1:
        # weight [C_in, C_out/g, k...]; TensorRT's kernels quantize ConvTranspose weights per input
        # channel, axis 0 (NVIDIA/TensorRT#2380)
        return 0
    if op == "MatMul":
        return rank - 1 if input_index == 1 else (rank - 2 if input_index == 0 else None)
    if op == "Gemm" and input_index in (0, 1):
        trans = _attr(consumer, "transB" if input_index == 1 else "transA", 0)
        if input_index == 1:
            return 0 if trans else 1
        return 1 if trans else 0
    return None


def _expected_block_axis(consumer, input_index: int, rank: int) -> int | None:
    """The reduction axis K of a constant weight (where INT4 blocks run)."""
    op = consumer.op_type
    if op == "MatMul" and input_index == 1:
        return rank - 2
    if op == "Gemm" and input_index == 1:
        return 1 if _attr(consumer, "transB", 0) else 0
    return None


def lint_qdq(path_or_model, target: str = "tensorrt", max_opset: int = TRT_MAX_OPSET) -> list[Finding]:
    """Check a QDQ graph (path or ``onnx.ModelProto``) against ``target``'s rules; [] when it conforms.

    Every finding names its rule (a key of :data:`RULES`) and the node; all findings are reported,
    not just the first, so one run shows everything to fix.
    """
    from onnx import TensorProto

    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    model = _load(path_or_model)
    G = _Graph(model)
    findings: list[Finding] = []

    def add(rule: str, node: str, message: str) -> None:
        findings.append(Finding(rule, node, message))

    float_scales = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)
    int4_types = (TensorProto.INT4,)
    ok_types = (TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN)
    needs = {13: None, 19: None, 21: None}  # minimum opset -> the node that needs it

    for n in G.nodes:
        if n.op_type not in QDQ_OPS or n.domain not in ("", "ai.onnx"):
            continue
        name = n.name or n.output[0]
        is_q = n.op_type == "QuantizeLinear"
        data, scale_name = n.input[0], n.input[1] if len(n.input) > 1 else ""
        zp_name = n.input[2] if len(n.input) > 2 else ""
        data_const = G.const(data)

        # ---- quantized type -----------------------------------------------------------------
        if is_q:
            qtype = G.elem_type(zp_name) if zp_name else _attr(n, "output_dtype", 0) or TensorProto.UINT8
        else:
            qtype = G.elem_type(data) if data_const is not None else (G.elem_type(zp_name) if zp_name else None)
            if qtype is None and data in G.producer and G.producer[data].op_type == "QuantizeLinear":
                q = G.producer[data]
                qtype = G.elem_type(q.input[2]) if len(q.input) > 2 and q.input[2] else (
                    _attr(q, "output_dtype", 0) or TensorProto.UINT8)
        if qtype is not None and qtype not in ok_types:
            why = (" (asymmetric; TensorRT refuses UINT8 Q/DQ on GPUs)" if qtype == TensorProto.UINT8 else
                   " (a DequantizeLinear of an int32 bias is ONNX Runtime's idiom; TensorRT wants a float bias)"
                   if qtype == TensorProto.INT32 else "")
            hint = " (a QuantizeLinear without a zero point means UINT8 in ONNX)" if is_q and not zp_name and not \
                _attr(n, "output_dtype", 0) else ""
            add("quant-type", name, f"quantizes to {_type_name(qtype)}; TensorRT takes INT8, or INT4 for "
                                    f"weights{why}{hint}")
        if qtype in int4_types or (zp_name and G.elem_type(zp_name) in int4_types):
            needs[21] = needs[21] or name
            if is_q:
                add("int4", name, "INT4 QuantizeLinear: TensorRT has INT4 for weights only (weight-only DQ)")

        # ---- zero point ---------------------------------------------------------------------
        if zp_name:
            zp = G.const(zp_name)
            if zp is None:
                add("zero-point", name, f"zero point {zp_name} is computed at run time; it must be a constant 0")
            elif np.any(zp.astype(np.int64) != 0):
                nz = zp.astype(np.int64).ravel()
                add("zero-point", name, f"zero point {nz[nz != 0][0]} (of {nz.size}): TensorRT is symmetric, "
                                        "zero points must be 0")

        # ---- scale --------------------------------------------------------------------------
        scale = G.const(scale_name) if scale_name else None
        if scale is None:
            add("scale", name, f"scale {scale_name or '(missing)'} is not a constant; TensorRT needs build-time "
                               "constant scales (initializer or Constant)")
            continue
        stype = G.elem_type(scale_name)
        if stype not in float_scales:
            add("scale", name, f"scale is {_type_name(stype)}; TensorRT takes FLOAT, FLOAT16 or BFLOAT16")
        elif stype != TensorProto.FLOAT:
            needs[19] = needs[19] or name
        sval = scale.astype(np.float64)
        if not np.all(np.isfinite(sval)) or np.any(sval <= 0):
            bad = sval[~(np.isfinite(sval) & (sval > 0))].ravel()
            add("scale", name, f"scale {bad[0]:g} ({bad.size} of {sval.size} entries not finite and > 0)")
        if zp_name and G.shape(zp_name) is not None and int(np.prod(G.shape(zp_name))) != scale.size:
            add("scale-shape", name, f"zero point shape {G.shape(zp_name)} != scale shape {scale.shape}")

        # ---- granularity and axis -----------------------------------------------------------
        axis = _attr(n, "axis", 1)
        block = _attr(n, "block_size", 0)
        if scale.size > 1 or scale.ndim > 1 or block:
            needs[13] = needs[13] or name
        if data_const is None:  # activation
            if scale.size != 1:
                add("scale-shape", name, f"activation scale has shape {scale.shape}: TensorRT quantizes "
                                         "activations per tensor (one scale)")
        else:  # constant weight
            shape = data_const.shape
            rank = len(shape)
            ax = axis + rank if axis < 0 else axis
            blocked = scale.ndim > 1  # ONNX: per-axis scales are 1-D; a scale of the weight's rank is blocked
            if blocked or block:
                needs[21] = needs[21] or name
                block_axes = [i for i in range(rank) if scale.ndim == rank and scale.shape[i] != shape[i]]
                if scale.ndim != rank or len(block_axes) != 1:
                    add("scale-shape", name, f"block scales {scale.shape} for weight {shape}: exactly one "
                                             "axis may be blocked")
                else:
                    bax = block_axes[0]
                    bs = shape[bax] // max(scale.shape[bax], 1)
                    if shape[bax] % max(scale.shape[bax], 1) or bs not in INT4_BLOCK_SIZES:
                        add("scale-shape", name, f"block size {shape[bax]}/{scale.shape[bax]} on axis {bax}: "
                                                 f"TensorRT supports blocks of {' or '.join(map(str, INT4_BLOCK_SIZES))}")
                    if block and block != bs:
                        add("scale-shape", name, f"block_size attribute {block} != {bs} implied by the scales")
                    if qtype not in int4_types:
                        add("int4", name, f"block-quantized {_type_name(qtype)} weight: TensorRT block-quantizes "
                                          "INT4 weights only")
                    for consumer, idx in _through(G, n.output[0]):
                        want = _expected_block_axis(consumer, idx, rank)
                        if want is not None and bax != want:
                            add("weight-axis", name, f"INT4 blocks run along axis {bax}; {consumer.op_type} "
                                                     f"{consumer.name} reduces over axis {want}")
            elif scale.size > 1:
                if scale.ndim != 1 or not 0 <= ax < rank or scale.size != shape[ax]:
                    add("scale-shape", name, f"per-channel scale {scale.shape} does not match weight {shape} on "
                                             f"axis {axis}")
                else:
                    for consumer, idx in _through(G, n.output[0]):
                        want = _expected_weight_axis(consumer, idx, rank)
                        if want is not None and ax != want:
                            add("weight-axis", name, f"per-channel scales on axis {ax}; {consumer.op_type} "
                                                     f"{consumer.name} has its output channels on axis {want}")
            if qtype in int4_types and not is_q:
                users = _through(G, n.output[0])
                bad_users = [c for c, i in users if not (c.op_type in ("MatMul", "Gemm") and
                                                         _expected_block_axis(c, i, rank) is not None)]
                if bad_users or not users:
                    add("int4", name, "INT4 weights feed " + (", ".join(f"{c.op_type} {c.name}" for c in bad_users)
                                                             or "nothing") +
                        ": TensorRT runs INT4 only as MatMul/Gemm weights (no INT4 convolution)")
                if not (blocked or block):
                    add("int4", name, f"INT4 weight with {'per-channel' if scale.size > 1 else 'per-tensor'} "
                                      "scales: TensorRT needs 2-D block scales for INT4")
                if rank and shape[-1] % 2:
                    add("int4", name, f"INT4 weight {shape} has an odd last dimension (two values per byte)")
                for c, i in users:
                    act = [x for j, x in enumerate(c.input[:2]) if j != i and x in G.producer
                           and G.producer[x].op_type == "DequantizeLinear"]
                    if c.op_type in ("MatMul", "Gemm") and act:
                        add("int4", name, f"{c.op_type} {c.name} also reads a quantized activation: TensorRT's "
                                          "INT4 is weight-only (the activation stays FP16/BF16)")

        # ---- placement and outputs --------------------------------------------------------------
        out = n.output[0]
        if _reaches_output(G, out):
            add("output", name, f"{n.op_type} produces the network output {_output_name(G, out)}; TensorRT fuses "
                                "Q/DQ into the layers they feed, keep network outputs float")
            continue
        users = G.consumers.get(out, [])
        if is_q:
            if not users:
                add("placement", name, "QuantizeLinear output is unused")
            for c, _ in users:
                if c.op_type != "DequantizeLinear":
                    add("placement", name, f"QuantizeLinear feeds {c.op_type} {c.name}; it must feed "
                                           "DequantizeLinear")
                elif (c.input[1] != scale_name and not _same_const(G, c.input[1], scale_name)) or \
                        not _same_const(G, c.input[2] if len(c.input) > 2 else "", zp_name):
                    add("placement", name, f"QuantizeLinear and {c.name} use different scales or zero points "
                                           "(a requantization TensorRT does not fuse)")
        else:
            if data_const is None and (data not in G.producer or G.producer[data].op_type != "QuantizeLinear"):
                add("placement", name, "DequantizeLinear of a run-time tensor that no QuantizeLinear produced")
            if not users:
                add("placement", name, "DequantizeLinear output is unused")
            for c, idx in users:
                if c.op_type not in LINEAR_OPS:
                    add("placement", name, f"DequantizeLinear feeds {c.op_type} {c.name}; TensorRT fuses Q/DQ "
                                           "only into Conv, ConvTranspose, MatMul and Gemm inputs")
                elif idx > 1:
                    add("placement", name, f"DequantizeLinear feeds input {idx} (bias) of {c.op_type} {c.name}; "
                                           "keep the bias float")

    # ---- opset ------------------------------------------------------------------------------
    v = _default_opset(model)
    if v is None:
        add("opset", "<model>", "no default-domain opset import")
    else:
        if not TRT_MIN_OPSET <= v <= max_opset:
            add("opset", "<model>", f"opset {v}: TensorRT's ONNX parser reads opsets {TRT_MIN_OPSET}..{max_opset}")
        why = {13: "per-channel Q/DQ", 19: "FLOAT16/BFLOAT16 Q/DQ scales", 21: "INT4 or block-quantized Q/DQ"}
        for need, node in sorted(needs.items()):
            if node is not None and v < need:
                add("opset", node, f"{why[need]} needs opset >= {need}; the graph has opset {v}")
    return findings


def _through(G: _Graph, tensor: str) -> list[tuple[Any, int]]:
    """Consumers of ``tensor``, looking through Cast/Identity (how TensorRT propagates Q/DQ)."""
    out = []
    for c, i in G.consumers.get(tensor, []):
        if c.op_type in PASS_THROUGH:
            out += _through(G, c.output[0])
        else:
            out.append((c, i))
    return out


def _reaches_output(G: _Graph, tensor: str) -> bool:
    if tensor in G.outputs:
        return True
    return any(c.op_type in PASS_THROUGH and _reaches_output(G, c.output[0]) for c, _ in G.consumers.get(tensor, []))


def _output_name(G: _Graph, tensor: str) -> str:
    if tensor in G.outputs:
        return tensor
    for c, _ in G.consumers.get(tensor, []):
        if c.op_type in PASS_THROUGH and _reaches_output(G, c.output[0]):
            return _output_name(G, c.output[0])
    return tensor


def _same_const(G: _Graph, a: str, b: str) -> bool:
    if a == b:
        return True
    if not a or not b:
        return False
    va, vb = G.const(a), G.const(b)
    return va is not None and vb is not None and va.shape == vb.shape and G.elem_type(a) == G.elem_type(b) and \
        bool(np.array_equal(va, vb))


def lint_bundle(bundle: str | os.PathLike, target: str = "tensorrt") -> dict[str, list[Finding]]:
    """Lint every QDQ graph a bundle holds for ``target`` (``engines/<target>/*.qdq.onnx``).

    Returns {graph name without ``.qdq.onnx``: findings}. Checksums are verified on the way (a
    graph changed since it was built would be linted but not be what the engine was built from).
    """
    from ptqd.bundle import Bundle

    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    b = Bundle.open(bundle)
    prefix = f"engines/{target}/"
    graphs = sorted(rel for rel in b.files if rel.startswith(prefix) and rel.endswith(".qdq.onnx"))
    if not graphs:
        raise UserError(f"{b.root} has no {target} QDQ graphs ({prefix}*.qdq.onnx); build them with "
                        f"`ptqd build {b.root} --backend {target}`, or lint the calibration with "
                        f"`ptqd lint {b.root} --target {target}`")
    return {rel[len(prefix):-len(".qdq.onnx")]: lint_qdq(b.path(rel), target) for rel in graphs}


def format_findings(results: dict[str, list[Finding]], limit: int | None = 20) -> str:
    """Human-readable report: one line per graph (with counts per rule), then its first ``limit``
    findings, one per line (None: all of them)."""
    lines = []
    for graph, found in results.items():
        if not found:
            lines.append(f"{graph:<12}ok")
            continue
        counts: dict[str, int] = {}
        for f in found:
            counts[f.rule] = counts.get(f.rule, 0) + 1
        lines.append(f"{graph:<12}{len(found)} finding(s): " + ", ".join(f"{r} {n}" for r, n in counts.items()))
        shown = found if limit is None else found[:limit]
        lines += [f"  {f}" for f in shown]
        if len(shown) < len(found):
            lines.append(f"  ... and {len(found) - len(shown)} more")
    return "\n".join(lines)


__all__ = ["RULES", "TARGETS", "Finding", "format_findings", "lint_bundle", "lint_qdq"]
