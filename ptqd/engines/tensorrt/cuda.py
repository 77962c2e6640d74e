"""The CUDA pieces the TensorRT engines need, through the CUDA runtime polygraphy loads (ctypes)."""

from __future__ import annotations

import ctypes
from typing import Any


def device_memory_size(engine) -> int:
    """Scratch memory one execution context of ``engine`` needs (max over its profiles)."""
    v2 = getattr(engine, "device_memory_size_v2", None)  # TensorRT >= 10.1
    return int(v2 if v2 is not None else engine.device_memory_size)


def user_managed_context(engine, trt):
    """An execution context that allocates no scratch memory of its own (the caller hands it some).
    TensorRT 10 takes the strategy directly; releases that create contexts from an IRuntimeConfig
    (10.11+, 11) take it through the config."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    try:
        return engine.create_execution_context(strategy)
    except TypeError:
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(config)


def cudart():
    """The CUDA runtime library polygraphy loaded (ctypes); one CUDA runtime in the process."""
    from polygraphy import cuda

    return cuda.wrapper().handle


def check_cuda(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"CUDA error {status} in {what}")


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of the current GPU, through the CUDA runtime polygraphy loads.
    ``cudaDeviceProp`` starts with ``char name[256]`` in every CUDA version, so a generous buffer
    avoids depending on the rest of the struct's layout."""
    try:
        lib = cudart()
        dev = ctypes.c_int(0)
        check_cuda(lib.cudaGetDevice(ctypes.byref(dev)), "cudaGetDevice")
        props = ctypes.create_string_buffer(16384)
        get = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
        check_cuda(get(props, dev), "cudaGetDeviceProperties")
        major, minor, rt = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        check_cuda(lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, dev), "cudaDeviceGetAttribute")  # CC major
        check_cuda(lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, dev), "cudaDeviceGetAttribute")  # CC minor
        lib.cudaRuntimeGetVersion(ctypes.byref(rt))
        return {"name": props.raw[:256].split(b"\0")[0].decode(errors="replace"),
                "compute_capability": f"{major.value}.{minor.value}", "cuda_runtime": rt.value, "device": dev.value}
    except (OSError, RuntimeError, AttributeError, ValueError) as e:  # a description, not a reason to fail
        return {"name": "unknown", "error": str(e)}
