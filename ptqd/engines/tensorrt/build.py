"""Building TensorRT plans through polygraphy: profiles, builder config, timing cache, descriptions."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ptqd.engines.tensorrt.cuda import device_memory_size, gpu_info
from ptqd.engines.tensorrt.options import TrtOptions, require_tensorrt
from ptqd.errors import UserError


def profile_shapes(inputs: Mapping[str, Sequence[int | None]], options: TrtOptions) -> dict[str, dict[str, list[int]]]:
    """The optimization profile: the batch dimension (axis 0 of every input) over
    ``options.profile_batches`` (CFG-doubled), every other dimension static as exported."""
    options.validate()
    lo, opt, hi = options.profile_batches
    out = {}
    for name, dims in inputs.items():
        if not dims:
            raise UserError(f"input {name} is a scalar; ptqd's UNet inputs all have a batch dimension")
        rest = list(dims[1:])
        if any(d is None for d in rest):
            raise UserError(f"input {name} has dynamic dimensions {dims} beyond the batch; TensorRT profiles here "
                            "fix them: export with a static latent size")
        out[name] = {"min": [lo] + rest, "opt": [opt] + rest, "max": [hi] + rest}
    return out


def build_spec(options: TrtOptions, shapes: Mapping[str, Mapping[str, list[int]]],
               timing_cache: str | os.PathLike | None = None) -> dict[str, Any]:
    """The builder configuration as plain data: recorded in build.json, turned into polygraphy's
    ``CreateConfig`` by :func:`create_config`. No precision flags: the network is strongly typed
    and every precision comes from the graph's tensor types and Q/DQ nodes."""
    options.validate()
    return {
        "strongly_typed": True,
        "precision_flags": [],
        "profiles": [{name: {k: list(v) for k, v in s.items()} for name, s in shapes.items()}],
        "timing_cache": None if timing_cache is None else str(timing_cache),
        "builder_optimization_level": options.builder_optimization_level,
        "workspace_bytes": options.workspace_bytes,
        "profiling_verbosity": "DETAILED",  # the engine inspector then reports every layer's tensor formats
        "options": asdict(options),
    }


def create_config(spec: Mapping[str, Any], trt=None):
    """polygraphy ``CreateConfig`` for ``spec``. ``trt``: the tensorrt module, for the settings that are
    TensorRT enums (profiling verbosity, memory pools); None where TensorRT is absent (CPU tests),
    which leaves those out and imports nothing from TensorRT."""
    from polygraphy.backend.trt import CreateConfig, Profile

    profiles = []
    for prof in spec["profiles"]:
        p = Profile()
        for name, s in prof.items():
            p.add(name, min=tuple(s["min"]), opt=tuple(s["opt"]), max=tuple(s["max"]))
        profiles.append(p)
    kwargs: dict[str, Any] = {"profiles": profiles, "load_timing_cache": spec.get("timing_cache")}
    if spec.get("builder_optimization_level") is not None:
        kwargs["builder_optimization_level"] = spec["builder_optimization_level"]
    if trt is not None:
        kwargs["profiling_verbosity"] = getattr(trt.ProfilingVerbosity, spec.get("profiling_verbosity", "DETAILED"))
        if spec.get("workspace_bytes"):
            kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE: int(spec["workspace_bytes"])}
    return CreateConfig(**kwargs)


# ---- build and inspect --------------------------------------------------------------------------
def build_engine(qdq_path: str | os.PathLike, plan_path: str | os.PathLike, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Parse ``qdq_path`` as a strongly typed network, build and serialize the plan to ``plan_path``
    (polygraphy: NetworkFromOnnxPath -> CreateConfig -> EngineBytesFromNetwork), updating the timing
    cache. Returns :func:`describe_engine` plus the build time."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import EngineBytesFromNetwork, NetworkFromOnnxPath
    from polygraphy.exception import PolygraphyException

    from ptqd.errors import ExportError

    t0 = time.perf_counter()
    network = NetworkFromOnnxPath(str(qdq_path), strongly_typed=spec.get("strongly_typed", True))
    try:
        data = EngineBytesFromNetwork(network, config=create_config(spec, trt),
                                      save_timing_cache=spec.get("timing_cache"))()
    except PolygraphyException as e:
        raise ExportError(f"TensorRT could not build {Path(qdq_path).name}: {e} (run `ptqd lint` on the bundle; "
                          "the log above has TensorRT's reason)", check="TensorRT build") from None
    Path(plan_path).write_bytes(bytes(data))
    desc = describe_engine(plan_path)
    desc["build_seconds"] = round(time.perf_counter() - t0, 1)
    return desc


_PRECISION_ORDER = ("int4", "fp8", "int8", "bf16", "fp16", "fp32")
_FORMAT_TOKENS = (("int4", "int4"), ("fp8", "fp8"), ("int8", "int8"), ("bf16", "bf16"), ("bfloat16", "bf16"),
                  ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32"), ("float", "fp32"))


def layer_precision(layer: Mapping[str, Any]) -> str:
    """A layer's compute precision from the inspector's JSON: the narrowest float or quantized type
    among its inputs' "Format/Datatype" strings (integer shape tensors ignored); "unknown" when the
    engine was built without detailed profiling verbosity."""
    found = set()
    for io in list(layer.get("Inputs", [])):
        fmt = str(io.get("Format/Datatype", "")).lower() if isinstance(io, Mapping) else ""
        for token, name in _FORMAT_TOKENS:
            if token in fmt.replace("-", ""):
                found.add(name)
                break
    return next((p for p in _PRECISION_ORDER if p in found), "unknown")


def summarize_layers(info: Mapping[str, Any]) -> dict[str, Any]:
    """{"layer_precisions": {precision: count}, "per_layer": [{name, type, precision}]} from
    ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``."""
    rows = []
    for layer in info.get("Layers", []):
        if isinstance(layer, str):  # built without DETAILED verbosity: names only
            rows.append({"name": layer, "type": None, "precision": "unknown"})
        else:
            rows.append({"name": layer.get("Name"), "type": layer.get("LayerType"), "precision": layer_precision(layer)})
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["precision"]] = counts.get(r["precision"], 0) + 1
    return {"layer_precisions": counts, "per_layer": rows}


def describe_engine(plan_path: str | os.PathLike) -> dict[str, Any]:
    """TensorRT version, GPU, device memory and per-layer precisions of a serialized plan."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise UserError(f"{plan_path}: TensorRT {trt.__version__} cannot load this plan (built by another TensorRT "
                        "version or for another GPU); rebuild it with `ptqd build --backend tensorrt`")
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return {"tensorrt": trt.__version__, "gpu": gpu_info(), "device_memory_bytes": device_memory_size(engine),
            "size_bytes": Path(plan_path).stat().st_size, "layers": engine.num_layers, **summarize_layers(info)}
