"""Quality of a configuration against FP on the same seeds and classes.

Metrics (one row per precision):
  fd            Fréchet distance between Gaussian fits of feature vectors of the samples and of
                held-out real images: ‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½). Features come from an
                ONNX model with outputs ``features`` (and optionally ``logits``): for the demo,
                the shipped digit classifier's penultimate layer; otherwise ``--features``.
  class_acc     share of samples the classifier assigns to their requested label
  fd_vs_fp      Fréchet distance between the features of a row's samples and FP's: what quantization
                should preserve is the FP model's distribution, not FD to real data (at guidance 3, extra
                noise adds diversity and can lower FD to real images below FP's own)
  psnr_vs_fp    paired PSNR (dB) of each decoded sample vs the FP sample from the same noise
  eps_mse       per step, mean squared error of the (guided) noise prediction vs FP's on the
                same x_t along the FP trajectory
Torch-free: runs the engines and the feature model through ONNX Runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.engines.onnxruntime import ort_session
from ptqd.errors import UserError
from ptqd.runtime.pipeline import predict, scheduler_for


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    import warnings

    with warnings.catch_warnings():  # dead ReLU features make Σ singular; sqrtm still converges
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # near-singular product: regularize, as the FID reference code does
        eps = np.eye(len(s1)) * 1e-6
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.asarray(covmean).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 NHWC images; identical images give +inf."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


class FeatureModel:
    """ONNX model: ``image`` float32 [N, C, H, W] in [-1, 1] -> ``features`` [N, F] (+ ``logits``)."""

    def __init__(self, path: Path):
        self.session = ort_session(path)
        self.outputs = [o.name for o in self.session.get_outputs()]
        if "features" not in self.outputs:
            raise UserError(f"{path} has no output named 'features' (outputs: {', '.join(self.outputs)})")

    def __call__(self, images_u8: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
        x = images_u8.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        feats, logits = [], []
        for i in range(0, len(x), batch):
            out = dict(zip(self.outputs, self.session.run(self.outputs, {"image": x[i:i + batch]})))
            feats.append(out["features"])
            if "logits" in out:
                logits.append(out["logits"])
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)


@dataclass
class EvalResult:
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    reference: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # uint8 NHWC per precision; not saved

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "reference": self.reference, "rows": self.rows}


def class_accuracy(logits: np.ndarray | None, labels: np.ndarray) -> float | None:
    return None if logits is None else float((logits.argmax(1) == labels).mean())


def evaluate_runners(facts, class_embedding, runners: dict[str, Any], decoder, labels: np.ndarray, seed: int,
                     cfg, batch: int = 100, features: FeatureModel | None = None,
                     real_features: np.ndarray | None = None, progress=None, eps_mse: bool = True) -> EvalResult:
    """``runners``: name -> runner; the first is the FP reference every other row is paired with."""
    from ptqd.runtime.pipeline import decode, sample_latents

    names = list(runners)
    fp = names[0]
    n = len(labels)
    images = {k: [] for k in names}
    mse = {k: np.zeros(len(scheduler_for(facts, cfg).timesteps)) for k in names}  # per UNet call
    seconds = {k: 0.0 for k in names}
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))

        def observe(i, t, x, ctx, eps_fp):
            for k in names[1:]:
                e = predict(runners[k], x, t, ctx)[0]
                mse[k][i] += float(((e - eps_fp) ** 2).sum())

        for k in names:
            t0 = time.perf_counter()
            lat = sample_latents(runners[k], facts, class_embedding, labels[idx], idx, seed, cfg,
                                 observe=observe if k == fp and len(names) > 1 and eps_mse else None)
            seconds[k] += time.perf_counter() - t0
            images[k].append(decode(decoder, lat, facts.scale_factor) if decoder is not None else lat)
        if progress is not None:
            progress.update(len(idx))
    per_elem = n * int(np.prod(facts.latent_shape))
    result = EvalResult(config={"num": n, "seed": seed, "steps": cfg.steps, "eta": cfg.eta,
                                "guidance": cfg.guidance, "spacing": cfg.spacing, "sampler": cfg.sampler_name})
    images = {k: np.concatenate(v) for k, v in images.items()}
    fp_feats = None
    for k in names:
        imgs = images[k]
        row: dict[str, Any] = {"precision": k, "seconds": round(seconds[k], 2)}
        if features is not None and decoder is not None:
            feats, logits = features(imgs)
            row["fd"] = frechet_distance(feats, real_features) if real_features is not None else None
            row["class_acc"] = class_accuracy(logits, labels)
            if k == fp:
                fp_feats = feats
            else:  # distribution fidelity to the FP model, blind to whether FP itself is close to the data
                row["fd_vs_fp"] = frechet_distance(feats, fp_feats)
        if k != fp:
            p = psnr(imgs, images[fp]) if decoder is not None else None
            row["psnr_vs_fp"] = float(np.mean(np.minimum(p, 100.0))) if p is not None else None
            if eps_mse:
                row["eps_mse"] = (mse[k] / per_elem).tolist()
                row["eps_mse_mean"] = float(np.mean(row["eps_mse"]))
        result.rows.append(row)
    result.images = images
    return result
