"""Engine runners: one small interface, ``runner(x, t, context) -> eps`` (numpy in, numpy out).

The runtime imports numpy and the chosen backend only; backends are imported when a runner
is created, never at ``import ptqd.runtime``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ptqd.errors import EngineInputError, MissingDependencyError, NonFiniteError


class Runner:
    """Base runner: ``__call__`` checks inputs and calls ``infer`` (override that).

    Checked before any inference: x is [B,C,H,W] and t is [B]; dimensions the engine fixes
    (``input_shapes``: name -> dims, None where dynamic) match; every value is finite. A quantized
    engine would turn NaN or Inf into plausible finite numbers (they saturate at the int8 limits),
    so a broken input is refused here rather than hidden in the output."""

    name = "runner"
    input_shapes: dict[str, tuple] | None = None

    def __call__(self, x: np.ndarray, t: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        x, t = np.ascontiguousarray(x, np.float32), np.ascontiguousarray(t, np.float32)
        if x.ndim != 4 or t.shape != (x.shape[0],):
            raise EngineInputError(f"expected x [B,C,H,W] and t [B], got {x.shape} and {t.shape}")
        context = None if context is None else np.ascontiguousarray(context, np.float32)
        for name, a in (("x", x), ("t", t), ("context", context)):
            if a is None:
                continue
            want = (self.input_shapes or {}).get(name)
            if want is not None and (a.ndim != len(want) or any(w is not None and w != d
                                                                 for w, d in zip(want[1:], a.shape[1:]))):
                dims = ",".join("B" if i == 0 or w is None else str(w) for i, w in enumerate(want))
                raise EngineInputError(f"the {self.name} engine takes {name} [{dims}], got {list(a.shape)}: the "
                                       "inputs do not fit this engine (do the bundle's model facts match it?)")
            if not np.isfinite(a).all():
                bad = int(a.size - np.count_nonzero(np.isfinite(a)))
                at = f" at t = {float(t[0]):g}" if t.size and np.isfinite(t[0]) else ""
                raise NonFiniteError(f"the {self.name} engine was given {bad} NaN/Inf value(s) of {a.size} in its "
                                     f"input {name}{at}: refusing to run it (the sampling diverged, or the inputs "
                                     "are broken)")
        return self.infer(x, t, context)

    def infer(self, x, t, context):  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
    from ptqd.runtime.packed import is_packed, load_session_bytes

    # 4-bit weights stored two per byte: expanded to int8 in memory
    src = load_session_bytes(path) if is_packed(path) else str(path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], disabled_optimizers=LOAD_DISABLED)


# QLinearConv stays NCHW (its kernel transposes internally) instead of NHWC with a Transpose node on each
# side: every integer conv is followed by float NCHW ops here, so those Transposes never cancel (mid-size
# cin256-v2, batch 1, 2 threads: w8a8 1.45x -> 1.51x ORT FP32, identical output; benchmarks/profile_ops.py)
LOAD_DISABLED = ["NhwcTransformer"]


def unet_feeds(input_names, x, t, context, what: str) -> dict[str, np.ndarray]:
    """The UNet's feeds by input name; ``context`` only where the graph takes one."""
    feeds = {"x": x, "t": t}
    if "context" in input_names:
        if context is None:
            raise ValueError(f"{what} needs a context input")
        feeds["context"] = context
    return feeds


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


class BucketedRunner(Runner):
    """One engine per timestep bucket (each with its own activation scales). A call goes to the bucket
    whose t-range holds its timestep, or the nearest one when sampling with another step count."""

    name = "bucketed"

    def __init__(self, buckets: list[tuple[tuple[float, float], Runner]]):
        if not buckets:
            raise ValueError("BucketedRunner needs at least one bucket")
        self.buckets = sorted(buckets, key=lambda b: b[0][0])

    def pick(self, t: float) -> Runner:
        def distance(rng):
            lo, hi = rng
            return 0.0 if lo <= t <= hi else min(abs(t - lo), abs(t - hi))

        return min(self.buckets, key=lambda b: distance(b[0]))[1]

    def infer(self, x, t, context):
        if not np.all(t == t[0]):
            raise ValueError("a bucketed engine runs one timestep per call (the sampler's batches share t)")
        return self.pick(float(t[0])).infer(x, t, context)
