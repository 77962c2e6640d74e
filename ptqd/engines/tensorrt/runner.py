"""Running TensorRT plans: an engine set sharing one device-memory allocation, and its runners."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.engines.runner import Runner, unet_feeds
from ptqd.engines.tensorrt.cuda import check_cuda, cudart, device_memory_size, user_managed_context
from ptqd.engines.tensorrt.options import require_tensorrt
from ptqd.errors import UserError


class TrtEngineSet:
    """Every engine of a plan, one device-memory allocation, one stream.

    A sampling plan switches precision per step, so its engines run one at a time: each execution
    context is created with ``ExecutionContextAllocationStrategy.USER_MANAGED`` and handed the same
    scratch buffer, sized for the largest engine (``device_memory_size_v2``), instead of each
    holding its own. Input and output buffers are shared too (the engines have the same I/O), at the
    profile's max batch. Calls are serialized by a lock; CUDA graphs (``cuda_graphs=True``) are
    captured per engine and batch size on first use (TensorRT's recipe: one ``execute_async_v3``
    to settle shapes, then capture one, then replay)."""

    def __init__(self, plans: Mapping[str, str | os.PathLike], cuda_graphs: bool = False):
        trt = require_tensorrt()
        from polygraphy import cuda
        from polygraphy.datatype import DataType

        if not plans:
            raise UserError("TrtEngineSet needs at least one plan")
        self._trt, self._cuda = trt, cuda
        self.cuda_graphs = cuda_graphs
        self.lock = threading.Lock()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engines = {}
        for name, path in plans.items():
            engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if engine is None:
                raise UserError(f"{path}: TensorRT {trt.__version__} cannot load this plan (another TensorRT version "
                                "or GPU); rebuild it with `ptqd build --backend tensorrt`")
            self.engines[name] = engine
        self.io = self._io_specs(next(iter(self.engines.values())))
        for name, engine in self.engines.items():
            if self._io_specs(engine) != self.io:
                raise UserError(f"engine {name} has other inputs/outputs than the rest of the plan; rebuild them together")
        self.max_batch = min(spec["max"][0] for spec in self.io.values() if spec["mode"] == "input")
        self.stream = cuda.Stream()
        self.device_memory_bytes = max(device_memory_size(e) for e in self.engines.values())
        self.scratch = cuda.DeviceArray.raw((max(self.device_memory_bytes, 1),))
        self.buffers = {name: cuda.DeviceArray(shape=tuple(spec["max"]), dtype=DataType.FLOAT32)
                        for name, spec in self.io.items()}
        self.contexts = {}
        for name, engine in self.engines.items():
            ctx = user_managed_context(engine, trt)
            if ctx is None:
                raise RuntimeError(f"TensorRT could not create an execution context for {name}")
            if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
                ctx.set_device_memory(self.scratch.ptr, self.scratch.allocated_nbytes)
            else:
                ctx.device_memory = self.scratch.ptr
            for t in self.io:
                if not ctx.set_tensor_address(t, self.buffers[t].ptr):
                    raise RuntimeError(f"TensorRT refused the address of {t} for {name}")
            self.contexts[name] = ctx
        self._graphs: dict[tuple[str, int], ctypes.c_void_p] = {}
        self.graph_fallback: dict[str, str] = {}

    def _io_specs(self, engine) -> dict[str, dict[str, Any]]:
        trt = self._trt
        specs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            if engine.get_tensor_dtype(name) != trt.float32:
                raise UserError(f"engine tensor {name} is {engine.get_tensor_dtype(name)}; ptqd's TensorRT graphs "
                                "keep float32 inputs and outputs: rebuild the plan")
            if mode == "input":
                lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
            else:
                lo = opt = hi = None
            specs[name] = {"mode": mode, "min": lo, "opt": opt, "max": hi}
        # outputs are as large as the inputs' max batch allows: [max_batch, *static dims]
        max_b = min(s["max"][0] for s in specs.values() if s["mode"] == "input")
        for name, s in specs.items():
            if s["mode"] == "output":
                dims = tuple(engine.get_tensor_shape(name))
                s["max"] = (max_b,) + tuple(dims[1:])
        return specs

    def runner(self, name: str) -> TrtRunner:
        if name not in self.engines:
            raise UserError(f"no {name} engine in this plan (have: {', '.join(self.engines)})")
        return TrtRunner(self, name)

    def execute(self, name: str, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """One call of engine ``name`` with batch <= max_batch; returns the single output (eps)."""
        ctx = self.contexts[name]
        n = next(iter(feeds.values())).shape[0]
        with self.lock:
            for t, arr in feeds.items():
                if tuple(ctx.get_tensor_shape(t)) != arr.shape and not ctx.set_input_shape(t, arr.shape):
                    raise ValueError(f"{name}: input {t} of shape {arr.shape} is outside the engine's profile "
                                     f"{self.io[t]['min']}..{self.io[t]['max']}")
                self.buffers[t].copy_from(np.ascontiguousarray(arr), self.stream)
            if self.cuda_graphs and name not in self.graph_fallback:
                self._launch_graph(name, n, ctx)
            elif not ctx.execute_async_v3(self.stream.ptr):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {name}; see the log above")
            out_name = next(t for t, s in self.io.items() if s["mode"] == "output")
            shape = tuple(ctx.get_tensor_shape(out_name))
            host = np.empty(shape, np.float32)
            self.buffers[out_name].view(shape=shape).copy_to(host, self.stream)
            self.stream.synchronize()
        return host

    def _launch_graph(self, name: str, n: int, ctx) -> None:
        lib = cudart()
        stream = ctypes.c_void_p(self.stream.ptr)
        key = (name, n)
        if key not in self._graphs:
            if not ctx.execute_async_v3(self.stream.ptr):  # settles shape-dependent state before capture
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {name}")
            graph, exe = ctypes.c_void_p(), ctypes.c_void_p()
            check_cuda(lib.cudaStreamBeginCapture(stream, ctypes.c_int(0)), "cudaStreamBeginCapture")  # global mode
            ok = ctx.execute_async_v3(self.stream.ptr)
            status = lib.cudaStreamEndCapture(stream, ctypes.byref(graph))
            if not ok or status != 0:
                self.graph_fallback[name] = f"capture failed (execute_async_v3 ok={ok}, cudaStreamEndCapture {status})"
                if graph.value:
                    lib.cudaGraphDestroy(graph)
                if not ctx.execute_async_v3(self.stream.ptr):
                    raise RuntimeError(f"TensorRT execute_async_v3 failed for {name}")
                return
            check_cuda(lib.cudaGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)),
                        "cudaGraphInstantiateWithFlags")
            lib.cudaGraphDestroy(graph)
            self._graphs[key] = exe
        check_cuda(lib.cudaGraphLaunch(self._graphs[key], stream), "cudaGraphLaunch")

    def close(self) -> None:
        if getattr(self, "_graphs", None):
            lib = cudart()
            for exe in self._graphs.values():
                lib.cudaGraphExecDestroy(exe)
            self._graphs.clear()
        self.contexts = {}  # contexts go before the memory they use
        for buf in list(getattr(self, "buffers", {}).values()) + ([self.scratch] if hasattr(self, "scratch") else []):
            buf.free()
        self.buffers = {}
        if hasattr(self, "stream"):
            self.stream.free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TrtRunner(Runner):
    """``runner(x, t, context) -> eps`` on one engine of a :class:`TrtEngineSet` (same interface as
    ``OrtRunner``). Batches larger than the profile's max are run in chunks."""

    name = "tensorrt"

    def __init__(self, engines: TrtEngineSet, precision: str):
        self.engines, self.precision = engines, precision
        self.inputs = [t for t, s in engines.io.items() if s["mode"] == "input"]

    def infer(self, x, t, context):
        feeds = unet_feeds(self.inputs, x, t, context, f"the {self.precision} engine")
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"the {self.precision} engine wants inputs {missing} ptqd does not provide")
        step = self.engines.max_batch
        outs = [self.engines.execute(self.precision, {k: v[s:s + step] for k, v in feeds.items()})
                for s in range(0, x.shape[0], step)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)
