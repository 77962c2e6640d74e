"""TensorRT backend: conformant QDQ graphs (``graph``), polygraphy builds (``build``), engines sharing one
device-memory allocation (``runner``), and the CPU linter of TensorRT's Q/DQ rules (``lint``).

Importing this package needs numpy and onnx only; TensorRT, polygraphy and the CUDA runtime load inside
the functions that need them (:func:`require_tensorrt` says in one line what to install).
"""

from ptqd.engines.tensorrt.build import (
    build_engine,
    build_spec,
    create_config,
    describe_engine,
    layer_precision,
    profile_shapes,
    summarize_layers,
)
from ptqd.engines.tensorrt.cuda import gpu_info
from ptqd.engines.tensorrt.graph import (
    convert_float16,
    graph_inputs,
    int4_block_size,
    numerics_summary,
    symmetric_act_scale,
    write_qdq_tensorrt,
)
from ptqd.engines.tensorrt.options import INSTALL_HINT, TIMING_CACHE, TrtOptions, require_tensorrt
from ptqd.engines.tensorrt.runner import TrtEngineSet, TrtRunner

__all__ = [
    "INSTALL_HINT",
    "TIMING_CACHE",
    "TrtEngineSet",
    "TrtOptions",
    "TrtRunner",
    "build_engine",
    "build_spec",
    "convert_float16",
    "create_config",
    "describe_engine",
    "gpu_info",
    "graph_inputs",
    "int4_block_size",
    "layer_precision",
    "numerics_summary",
    "profile_shapes",
    "require_tensorrt",
    "summarize_layers",
    "symmetric_act_scale",
    "write_qdq_tensorrt",
]
