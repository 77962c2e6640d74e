"""ONNX Runtime backend: build an engine (the optimized QDQ model ORT saves), describe it, run it
(``OrtRunner``, ``OrtDecoder``), and ONNX Runtime's own ``quantize_static`` as the peer users would pick.

The engine is saved at ``ORT_ENABLE_EXTENDED``: QDQ fusions (QLinearConv, MatMulIntegerToFloat,
...) are applied, but not the NCHWc layout transforms of ``ORT_ENABLE_ALL``, which are specific
to the build machine's instruction set; ORT applies those again when the engine is loaded.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np

from ptqd.engines.qdq import node_key
from ptqd.engines.runner import Runner, unet_feeds
from ptqd.errors import MissingDependencyError, NonFiniteError

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger", "QGemm",
               "DynamicQuantizeMatMul")


BUILD_DISABLED = ["MatMulAddFusion"]


def build_engine(model_path: Path, engine_path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(engine_path)
    data = Path(engine_path).with_name(Path(engine_path).name + ".data")
    data.unlink(missing_ok=True)
    if Path(model_path).with_name(Path(model_path).name + ".data").is_file():  # a graph over 1 GiB: so is the engine
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", data.name)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    # MatMulAddFusion would turn a quantized 2-D linear layer (MatMul + bias Add: the embedding Gemms, see
    # ``qdq``) back into a Gemm on dequantized weights before the QDQ fusions see it: it must become
    # MatMulIntegerToFloat like every other linear layer
    ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"], disabled_optimizers=BUILD_DISABLED)


def pack_4bit_weights(engine_path: Path, layers) -> dict:
    """Rewrite a built engine with the int8 weights of its 4-bit layers stored two per byte (INT4
    initializers, ``ptqd.engines.packed``); the runners expand them when the engine is loaded.
    Layers on 8-bit grids (first/last, role "w8") keep int8 weights. Returns what was packed."""
    from ptqd.engines.onnx_io import load_model, save_model
    from ptqd.engines.packed import pack_initializers

    model = load_model(engine_path)
    present = {i.name for i in model.graph.initializer}
    names = [f"{node_key(lq.name)}_w_int8" for lq in layers if lq.w_bits <= 4]
    names = [n for n in names if n in present]
    data = engine_path.with_name(engine_path.name + ".data")
    before = engine_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    saved = pack_initializers(model, names)
    save_model(model, engine_path)
    return {"packed_int4_weights": len(names), "packed_bytes_saved": saved, "unpacked_size_bytes": before}


def describe_engine(engine_path: Path, layer_rows: list[dict]) -> dict:
    """Op-type counts after optimization and the share of conv+linear MACs on integer kernels.

    A layer runs on an integer kernel when an integer op consumes its int8 weight (QDQ writer
    names: ``<node>_w_int8``) or, for ORT's own quantizer, the layer's original weight name.
    ``layer_rows``: the layers the engine computes (a build leaves out the ones ``graph_opt`` pruned: a one-key
    attention's q and k projections).
    """
    import onnx
    import onnxruntime as ort

    g = onnx.load(str(engine_path), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in g.node)
    int_inputs = {i for n in g.node if n.op_type in INTEGER_OPS for i in n.input}
    total = sum(r["macs"] for r in layer_rows if r["kind"] in ("conv", "linear"))
    on_int, int_layers = 0, []
    for r in layer_rows:
        if r["kind"] not in ("conv", "linear"):
            continue
        names = {f"{node_key(r['name'])}_w_int8"}
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
        "size_bytes": engine_path.stat().st_size + sum(
            (engine_path.parent / loc).stat().st_size for loc in external_data_files(g)
            if (engine_path.parent / loc).is_file()),
    }


def external_data_files(graph) -> set[str]:
    """The external data files a graph's initializers live in (relative to the graph's folder): part of
    an engine's size (ORT's saved optimized model can point at its QDQ graph's ``.data``)."""
    return {e.value for t in graph.initializer if t.data_location == 1  # onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}


def ort_session(path: str | os.PathLike, threads: int | None = None, allow_spinning: bool = True):
    """An ONNX Runtime CPU session. ``allow_spinning=False`` when several sessions take turns
    (engine switching): an idle session's spinning threads otherwise steal a core (MEASURED.md)."""
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    if not allow_spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from ptqd.engines.packed import is_packed, load_session_bytes

    # 4-bit weights stored two per byte: expanded to int8 in memory (over 2 GB, the largest handed over as arrays)
    src, arrays = load_session_bytes(path, so) if is_packed(path) else (str(path), [])
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], disabled_optimizers=LOAD_DISABLED)
    del arrays  # ONNX Runtime has copied them in
    return sess


# QLinearConv stays NCHW (its kernel transposes internally) instead of NHWC with a Transpose node on each
# side: every integer conv is followed by float NCHW ops here, so those Transposes never cancel (mid-size
# cin256-v2, batch 1, 2 threads: w8a8 1.45x -> 1.51x ORT FP32, identical output; benchmarks/profile_ops.py)
LOAD_DISABLED = ["NhwcTransformer"]


class OrtRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, allow_spinning: bool = True):
        self.path = Path(path)
        self.session = ort_session(path, threads, allow_spinning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                             for i in self.session.get_inputs()}

    def infer(self, x, t, context):
        return self.session.run(["eps"], unet_feeds(self.input_names, x, t, context, self.path.name))[0]

    def close(self) -> None:
        """Let go of the session (its weights: GBs for a large UNet) even while this object is referenced."""
        self.session = None


class OrtDecoder:
    """First-stage decoder engine: latent z -> image in [-1, 1]."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.session = ort_session(path, threads)

    def __call__(self, z: np.ndarray) -> np.ndarray:
        z = np.ascontiguousarray(z, np.float32)
        if not np.isfinite(z).all():
            raise NonFiniteError(f"the decoder was given {int(z.size - np.count_nonzero(np.isfinite(z)))} NaN/Inf "
                                 f"latent value(s) of {z.size}: refusing to decode them (the sampling diverged)")
        return self.session.run(["image"], {"z": z})[0]


def quantize_static_peer(fp_onnx: Path, out_qdq: Path, feeds: dict, exclude_nodes: list[str],
                         chunk: int = 64) -> None:
    """ONNX Runtime's own ``quantize_static`` on the same calibration inputs (``feeds``: x, t[, context]):
    the tool users would pick instead. QDQ, U8 activations (MinMax), S8 per-channel weights, reduce_range,
    Conv/MatMul/Gemm only; ``exclude_nodes`` (the attention matmuls) stay float (MEASURED.md)."""
    import logging
    import shutil
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    n = len(feeds["t"])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            if self.i >= n:
                return None
            sl = slice(self.i, self.i + chunk)
            self.i += chunk
            return {k: feeds[k][sl] for k in ("x", "t", "context") if k in feeds}

    logging.disable(logging.WARNING)  # quantize_static's advice to pre-process goes to the root logger
    src = Path(fp_onnx)
    with tempfile.TemporaryDirectory(prefix="ptqd-peer-") as tmp:
        ext = src.with_name(src.name + ".data")
        if ext.exists():  # onnx.load refuses hard-linked external data (the staging copy): use a private copy
            shutil.copy(src, Path(tmp) / src.name)
            shutil.copy(ext, Path(tmp) / ext.name)
            src = Path(tmp) / src.name
        try:
            quantize_static(str(src), str(out_qdq), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                            nodes_to_exclude=exclude_nodes, use_external_data_format=ext.exists())
        finally:
            logging.disable(logging.NOTSET)
