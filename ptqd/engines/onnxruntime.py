"""ONNX Runtime backend: build an engine (the optimized QDQ model ORT saves) and describe it.

The engine is saved at ``ORT_ENABLE_EXTENDED``: QDQ fusions (QLinearConv, MatMulIntegerToFloat,
...) are applied, but not the NCHWc layout transforms of ``ORT_ENABLE_ALL``, which are specific
to the build machine's instruction set; ORT applies those again when the engine is loaded.
"""

from __future__ import annotations

import collections
from pathlib import Path

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QGemm",
               "DynamicQuantizeMatMul")


BUILD_DISABLED = ["MatMulAddFusion"]


def build_engine(model_path: Path, engine_path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(engine_path)
    # MatMulAddFusion would turn a quantized 2-D linear layer (MatMul + bias Add: the embedding Gemms, see
    # ``qdq``) back into a Gemm on dequantized weights before the QDQ fusions see it: it must become
    # MatMulIntegerToFloat like every other linear layer
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"], disabled_optimizers=BUILD_DISABLED)


def pack_4bit_weights(engine_path: Path, layers) -> dict:
    """Rewrite a built engine with the int8 weights of its 4-bit layers stored two per byte (INT4
    initializers, ``ptqd.runtime.packed``); the runners expand them when the engine is loaded.
    Layers on 8-bit grids (first/last, role "w8") keep int8 weights. Returns what was packed."""
    import onnx

    from ptqd.engines.onnx_io import load_model
    from ptqd.engines.qdq import _safe
    from ptqd.runtime.packed import pack_initializers

    model = load_model(engine_path)
    present = {i.name for i in model.graph.initializer}
    names = [f"{_safe(lq.name)}_w_int8" for lq in layers if lq.w_bits <= 4]
    names = [n for n in names if n in present]
    before = engine_path.stat().st_size
    saved = pack_initializers(model, names)
    onnx.save_model(model, str(engine_path))
    return {"packed_int4_weights": len(names), "packed_bytes_saved": saved, "unpacked_size_bytes": before}


def describe_engine(engine_path: Path, layer_rows: list[dict]) -> dict:
    """Op-type counts after optimization and the share of conv+linear MACs on integer kernels.

    A layer runs on an integer kernel when an integer op consumes its int8 weight (QDQ writer
    names: ``<node>_w_int8``) or, for ORT's own quantizer, the layer's original weight name.
    """
    import onnx
    import onnxruntime as ort

    from ptqd.engines.qdq import _safe

    g = onnx.load(str(engine_path), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in g.node)
    int_inputs = {i for n in g.node if n.op_type in INTEGER_OPS for i in n.input}
    total = sum(r["macs"] for r in layer_rows if r["kind"] in ("conv", "linear"))
    on_int, int_layers = 0, []
    for r in layer_rows:
        if r["kind"] not in ("conv", "linear"):
            continue
        names = {f"{_safe(r['name'])}_w_int8"}
        if r.get("weight"):
            names |= {f"{r['weight']}_quantized", f"{r['weight']}_quantized_transposed"}
        if names & int_inputs:
            on_int += r["macs"]
            int_layers.append(r["name"])
    return {
        "onnxruntime": ort.__version__,
        "ops": dict(sorted(ops.items())),
        "integer_kernel_ops": {k: v for k, v in ops.items() if k in INTEGER_OPS},
        "float_conv_matmul_ops": {k: ops[k] for k in ("Conv", "FusedConv", "MatMul", "Gemm", "FusedMatMul") if k in ops},
        "conv_linear_macs": total,
        "integer_macs": on_int,
        "integer_mac_share": on_int / total if total else 0.0,
        "integer_layers": len(int_layers),
        "size_bytes": engine_path.stat().st_size,
    }
