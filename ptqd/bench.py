"""Latency measurement: engines timed round-robin in one process, medians after warm-up.

Each round runs every engine once, so drift on a noisy machine hits all of them alike; speed is
reported as a ratio to ONNX Runtime FP32 measured in the same rounds.
"""

from __future__ import annotations

import time

import numpy as np


def round_robin(calls: dict, runs: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """``calls``: name -> zero-argument callable. Returns name -> seconds per run (after warm-up)."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for i in range(warmup + runs):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def unet_latency(b, precisions, batch: int = 2, runs: int = 20, warmup: int = 3, threads: int | None = None,
                 runners: dict | None = None) -> dict[str, dict[str, float]]:
    """UNet forward latency (ms, median and min) per precision at ``batch`` (2 = one CFG-guided sample),
    with the median ratio to FP32. Spinning is off for every engine alike (several sessions take turns)."""
    from ptqd.api import open_engine
    from ptqd.exporter.validate import seeded_unet_inputs

    names = ["fp32"] + [p for p in precisions if p != "fp32"]
    runners = dict(runners or {})
    for p in names:
        if p not in runners:
            runners[p] = open_engine(b, p, threads=threads, allow_spinning=False)
    feeds = seeded_unet_inputs(b.facts, batch, 501.0, 0)
    args = (feeds["x"], feeds["t"], feeds.get("context"))
    times = round_robin({p: (lambda r=runners[p]: r(*args)) for p in names}, runs, warmup)
    med = {p: float(np.median(v)) for p, v in times.items()}
    return {p: {"median_ms": 1e3 * med[p], "min_ms": 1e3 * float(np.min(times[p])),
                "speedup_vs_fp32": med["fp32"] / med[p]} for p in names}
