"""The runner interface: ``runner(x, t, context) -> eps`` (numpy in, numpy out), shared by every backend.

A runner checks its inputs in ``__call__`` and then calls ``infer`` (what a backend overrides), like
polygraphy's ``infer`` / ``infer_impl``. Importing this module needs numpy only.
"""

from __future__ import annotations

import time

import numpy as np

from ptqd.errors import EngineInputError, NonFiniteError


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


def unet_feeds(input_names, x, t, context, what: str) -> dict[str, np.ndarray]:
    """The UNet's feeds by input name; ``context`` only where the graph takes one."""
    feeds = {"x": x, "t": t}
    if "context" in input_names:
        if context is None:
            raise ValueError(f"{what} needs a context input")
        feeds["context"] = context
    return feeds


def nearest_bucket(t: float, ranges) -> int:
    """Index of the t-range (lo, hi) that holds t, else of the nearest one; a tie goes to the range of lower t,
    whatever the order of ``ranges`` (the engines and the fake-quant models list them in different orders)."""
    def key(k):
        lo, hi = ranges[k]
        return (0.0 if lo <= t <= hi else min(abs(t - lo), abs(t - hi)), lo, hi)

    return min(range(len(ranges)), key=key)


class BucketedRunner(Runner):
    """One engine per timestep bucket (each with its own activation scales). A call goes to the bucket
    whose t-range holds its timestep, or the nearest one when sampling with another step count."""

    name = "bucketed"

    def __init__(self, buckets: list[tuple[tuple[float, float], Runner]]):
        if not buckets:
            raise ValueError("BucketedRunner needs at least one bucket")
        self.buckets = sorted(buckets, key=lambda b: b[0][0])

    def pick(self, t: float) -> Runner:
        return self.buckets[nearest_bucket(t, [b[0] for b in self.buckets])][1]

    def infer(self, x, t, context):
        if not np.all(t == t[0]):
            raise ValueError("a bucketed engine runs one timestep per call (the sampler's batches share t)")
        return self.pick(float(t[0])).infer(x, t, context)

    def close(self) -> None:
        for _, r in self.buckets:
            r.close()


def round_robin(calls: dict, runs: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """``calls``: name -> zero-argument callable, run interleaved (each round calls every one once, so drift in
    the machine's speed hits them alike). Each round starts one call later than the one before, so every call
    takes every place in the round equally often over ``len(calls)`` rounds: the one that follows a given other
    (whose weights and threads it finds in the caches) is not always the same. Returns name -> seconds per run
    (after warm-up)."""
    names = list(calls)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + runs):
        start = i % len(names) if names else 0
        for k in names[start:] + names[:start]:
            t0 = time.perf_counter()
            calls[k]()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times
