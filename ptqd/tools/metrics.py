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
    """Fréchet distance between Gaussian fits of two feature sets [N, F]."""
    return frechet_from_moments(*Gaussian.of(f1).moments(), *Gaussian.of(f2).moments())


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 NHWC images; identical images give +inf."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


class FeatureModel:
    """ONNX model: ``image`` float32 [N, C, H, W] in [-1, 1] -> ``features`` [N, F] (+ ``logits``)."""

    def __init__(self, path: Path, threads: int | None = None):
        self.session = ort_session(path, threads)
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

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "reference": self.reference, "rows": self.rows}


@dataclass
class Gaussian:
    """Running sums of feature vectors (float64): what a Fréchet distance needs, mergeable across shards."""

    n: int
    total: np.ndarray  # [F]
    outer: np.ndarray  # [F, F]

    @classmethod
    def of(cls, feats: np.ndarray) -> "Gaussian":
        f = np.asarray(feats, np.float64)
        return cls(len(f), f.sum(0), f.T @ f)

    def __add__(self, o: "Gaussian") -> "Gaussian":
        return Gaussian(self.n + o.n, self.total + o.total, self.outer + o.outer)

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (as ``np.cov``)."""
        mu = self.total / self.n
        return mu, (self.outer - self.n * np.outer(mu, mu)) / max(self.n - 1, 1)


def frechet_from_moments(mu1, s1, mu2, s2) -> float:
    from scipy import linalg
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


def class_accuracy(logits: np.ndarray | None, labels: np.ndarray) -> float | None:
    return None if logits is None else float((logits.argmax(1) == labels).mean())


@dataclass
class BatchStats:
    """One eval batch's contribution per row: what the metrics are merged from (sums, per-image values), so that
    a run split into shards of whole batches merges to the single-process numbers exactly."""

    n: int
    seconds: dict[str, float]
    mse: dict[str, np.ndarray]  # per UNet call: summed squared ε error vs FP on FP's trajectory
    psnr: dict[str, np.ndarray]  # per image, vs FP's image from the same noise
    feats: dict[str, Gaussian]
    correct: dict[str, int]  # samples the classifier gives their requested label


def eval_batch(facts, class_embedding, runners: dict[str, Any], decoder, labels: np.ndarray, idx: np.ndarray,
               seed: int, cfg, features: FeatureModel | None = None, eps_mse: bool = True) -> BatchStats:
    """Sample indices ``idx`` with every runner (the first is FP) and measure them."""
    from ptqd.runtime.pipeline import decode, sample_latents

    names = list(runners)
    fp = names[0]
    mse = {k: np.zeros(len(scheduler_for(facts, cfg).timesteps)) for k in names}

    def observe(i, t, x, ctx, eps_fp):
        for k in names[1:]:
            e = predict(runners[k], x, t, ctx)[0]
            mse[k][i] += float(((e - eps_fp) ** 2).sum())

    st = BatchStats(len(idx), {}, mse if eps_mse else {}, {}, {}, {})
    images = {}
    for k in names:
        t0 = time.perf_counter()
        lat = sample_latents(runners[k], facts, class_embedding, labels, idx, seed, cfg,
                             observe=observe if k == fp and len(names) > 1 and eps_mse else None)
        st.seconds[k] = time.perf_counter() - t0
        images[k] = decode(decoder, lat, facts.scale_factor) if decoder is not None else None
        if features is not None and decoder is not None:
            feats, logits = features(images[k])
            st.feats[k] = Gaussian.of(feats)
            if logits is not None:
                st.correct[k] = int((logits.argmax(1) == labels).sum())
        if k != fp and decoder is not None:
            st.psnr[k] = np.minimum(psnr(images[k], images[fp]), 100.0)
    return st


class EvalTotals:
    """Batch stats folded in index order as they come (the order fixes the floating-point result, so a run split
    into shards of whole batches gives the single-process numbers); memory stays one set of sums per row, however
    many samples (a 2048-feature Inception Σ is 32 MB, not 32 MB per batch)."""

    def __init__(self):
        self.n, self.names = 0, None
        self.seconds, self.mse, self.feats, self.correct, self.psnr = {}, {}, {}, {}, {}

    def add(self, st: BatchStats) -> None:
        if self.names is None:
            self.names = list(st.seconds)
        self.n += st.n
        for k in self.names:
            self.seconds[k] = self.seconds.get(k, 0.0) + st.seconds[k]
            if k in st.mse:
                self.mse[k] = self.mse[k] + st.mse[k] if k in self.mse else st.mse[k].copy()
            if k in st.feats:
                self.feats[k] = self.feats[k] + st.feats[k] if k in self.feats else st.feats[k]
            if k in st.correct:
                self.correct[k] = self.correct.get(k, 0) + st.correct[k]
            if k in st.psnr:
                self.psnr.setdefault(k, []).append(st.psnr[k])

    def result(self, config: dict[str, Any], latent_elems: int, real: Gaussian | None = None) -> EvalResult:
        names, n = self.names or [], self.n
        fp = names[0] if names else None
        res = EvalResult(config=dict(config, num=n))
        moments = {k: g.moments() for k, g in self.feats.items()}
        for k in names:
            row: dict[str, Any] = {"precision": k, "seconds": round(self.seconds[k], 2)}
            if k in moments:
                row["fd"] = frechet_from_moments(*moments[k], *real.moments()) if real is not None else None
                row["class_acc"] = self.correct[k] / n if k in self.correct else None
                if k != fp:  # distribution fidelity to the FP model, blind to whether FP itself is close to the data
                    row["fd_vs_fp"] = frechet_from_moments(*moments[k], *moments[fp])
            if k != fp:
                row["psnr_vs_fp"] = float(np.mean(np.concatenate(self.psnr[k]))) if k in self.psnr else None
                if k in self.mse:
                    row["eps_mse"] = (self.mse[k] / (n * latent_elems)).tolist()
                    row["eps_mse_mean"] = float(np.mean(row["eps_mse"]))
            res.rows.append(row)
        return res


def eval_config(n: int, seed: int, cfg) -> dict[str, Any]:
    return {"num": n, "seed": seed, "steps": cfg.steps, "eta": cfg.eta, "guidance": cfg.guidance,
            "spacing": cfg.spacing, "sampler": cfg.sampler_name}


def evaluate_runners(facts, class_embedding, runners: dict[str, Any], decoder, labels: np.ndarray, seed: int,
                     cfg, batch: int = 100, features: FeatureModel | None = None,
                     real_features: np.ndarray | None = None, progress=None, eps_mse: bool = True) -> EvalResult:
    """``runners``: name -> runner; the first is the FP reference every other row is paired with."""
    n = len(labels)
    totals = EvalTotals()
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))
        totals.add(eval_batch(facts, class_embedding, runners, decoder, labels[idx], idx, seed, cfg, features,
                              eps_mse))
        if progress is not None:
            progress.update(len(idx))
    real = Gaussian.of(real_features) if real_features is not None else None
    return totals.result(eval_config(n, seed, cfg), int(np.prod(facts.latent_shape)), real)
