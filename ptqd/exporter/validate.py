"""Exported graph vs the torch model it came from, on seeded inputs (on by default).

Every timestep is checked and every failure reported at once; the worst absolute error is
bounded by ``atol + rtol · max|torch output|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptqd.errors import ExportError
from ptqd.facts import seeded_unet_inputs  # noqa: F401  (re-exported)

DEFAULT_TIMESTEPS = (1, 251, 501, 751, 999)


@dataclass(frozen=True)
class ValidationConfig:
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    batch: int = 2
    seed: int = 0
    atol: float = 1e-4
    rtol: float = 1e-4


# Above 2 GiB of parameters (onnx_export.LARGE) the UNet is checked at two timesteps, batch 1: SDXL's at
# 1024x1024 takes about a minute a forward on 2 cores, in torch and again in ONNX Runtime.
LARGE_VALIDATION = ValidationConfig(timesteps=(1, 999), batch=1)


def _session(path: Path, basic: bool = False):
    """``basic``: basic graph optimizations only (no layout transforms, which would copy a large model's conv
    weights a second time)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def release_weights(module: torch.nn.Module) -> None:
    """Give a module's parameters and buffers back to the system (moved to the meta device: the module keeps its
    structure, not its numbers), so that ONNX Runtime's copy of a large model need not sit beside torch's."""
    import ctypes
    import gc

    module.to("meta")
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def validate_unet(loaded, onnx_path: Path, cfg: ValidationConfig = ValidationConfig(),
                  class_rows: np.ndarray | None = None, release: bool = False) -> dict[str, Any]:
    """Compare ONNX Runtime with torch at each timestep. Context rows are real class embeddings when given.

    torch's outputs come first. ``release``: then free the torch UNet's weights (:func:`release_weights`; the
    caller no longer needs them) before ONNX Runtime loads the graph, with basic optimizations only, so a
    large model is held once at a time (SDXL's 10.3 GB UNet would otherwise be held twice, and more)."""
    T = loaded.facts.schedule.num_train_timesteps
    cases = []
    for i, t in enumerate(cfg.timesteps):
        t = min(float(t), T - 1)
        feeds = seeded_unet_inputs(loaded.facts, cfg.batch, t, cfg.seed + i)
        if "context" in feeds and class_rows is not None:
            idx = np.random.RandomState(cfg.seed + i).randint(0, len(class_rows), cfg.batch)
            ctx = class_rows[idx]  # class embeddings [B, D], or encoded prompts [B, tokens, D]
            feeds["context"] = (ctx[:, None, :] if ctx.ndim == 2 else ctx).astype(np.float32)
        with torch.no_grad():
            cases.append((t, feeds, loaded.unet(*(torch.from_numpy(v) for v in feeds.values())).numpy()))
    if release:
        release_weights(loaded.unet)
    sess = _session(onnx_path, basic=release)
    rows, failures = [], []
    for t, feeds, ref in cases:
        got = sess.run(["eps"], feeds)[0]
        err = float(np.abs(got - ref).max())
        bound = cfg.atol + cfg.rtol * float(np.abs(ref).max())
        rows.append({"t": t, "max_abs_error": err, "bound": bound, "max_abs_torch": float(np.abs(ref).max())})
        if not np.isfinite(got).all() or err > bound:
            failures.append(f"t={t:g}: max |onnx - torch| = {err:.3g} > {bound:.3g}")
    del sess
    report = {"what": "unet", "batch": cfg.batch, "seed": cfg.seed, "per_timestep": rows,
              "worst_abs_error": max(r["max_abs_error"] for r in rows), "passed": not failures}
    if failures:
        raise ExportError("exported UNet does not match torch: " + "; ".join(failures))
    return report


def validate_first_stage(loaded, onnx_path: Path, cfg: ValidationConfig = ValidationConfig()) -> dict[str, Any]:
    sess = _session(onnx_path)
    c, h, w = loaded.facts.latent_shape
    z = np.random.RandomState(cfg.seed).standard_normal((cfg.batch, c, h, w)).astype(np.float32)
    with torch.no_grad():
        ref = loaded.first_stage(torch.from_numpy(z)).numpy()
    err, bound = matches(sess.run(["image"], {"z": z})[0], ref, cfg, "first-stage decoder")
    return {"what": "first_stage", "batch": cfg.batch, "worst_abs_error": err, "bound": bound, "passed": True}


def matches(got: np.ndarray, ref: np.ndarray, cfg: ValidationConfig, what: str) -> tuple[float, float]:
    """(max |onnx - torch|, its bound atol + rtol·max|torch|); ExportError when beyond it or not finite."""
    err = float(np.abs(got - ref).max())
    bound = cfg.atol + cfg.rtol * float(np.abs(ref).max())
    if not np.isfinite(got).all() or err > bound:
        raise ExportError(f"exported {what} does not match torch: max |onnx - torch| = {err:.3g} > {bound:.3g}")
    return err, bound


def validate_text_encoder(loaded, onnx_path: Path, prompts: list[str], cfg: ValidationConfig = ValidationConfig()
                          ) -> dict[str, Any]:
    """The exported text encoder vs torch on the pipeline's own token ids of ``prompts``."""
    from ptqd.models.text import model_token_ids

    sess = _session(onnx_path)
    ids = model_token_ids(loaded, prompts)
    with torch.no_grad():
        ref = loaded.text_encoder(*(torch.from_numpy(a) for a in ids)).numpy()
    feeds = dict(zip(["input_ids", "input_ids_2"], ids))
    err, bound = matches(sess.run(["context"], feeds)[0], ref, cfg, "text encoder")
    return {"what": "text_encoder", "prompts": len(prompts), "worst_abs_error": err, "bound": bound, "passed": True}
