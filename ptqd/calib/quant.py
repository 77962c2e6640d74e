"""Quantizer math (numpy): scales, zero points, range search, rounding. No state, no I/O.

Integer grids (b bits):
  weights      symmetric, per output channel: q ∈ [-(2^(b-1)-1), 2^(b-1)-1], z = 0,
               s_c = r_c / (2^(b-1)-1) with r_c the chosen range of channel c
  activations  asymmetric, per tensor: q ∈ [0, 2^b - 1], s = (hi - lo) / (2^b - 1),
               z = round(-lo / s) clamped to the grid (so 0.0 is exactly representable)
  fake quant   x̂ = s · (clamp(round(x / s) + z, q_min, q_max) - z)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLIP_RATIOS = np.linspace(0.3, 1.0, 36)
EXACT_F32 = 2**24  # float32 adds integers exactly while every partial sum stays below this


def weight_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class ActQuant:
    """Per-tensor activation quantizer: scale, zero point, bits (grid [0, 2^bits - 1])."""

    scale: float
    zero_point: int
    bits: int

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @property
    def int8_symmetric(self) -> bool:
        """An 8-bit grid centred on 0 (zero point 128): int8 with zero point 0, the same values."""
        return self.bits == 8 and self.zero_point == 128

    @property
    def range(self) -> tuple[float, float]:
        """The representable float interval [lo, hi]."""
        return (-self.zero_point * self.scale, (self.qmax - self.zero_point) * self.scale)

    def fake(self, x: np.ndarray) -> np.ndarray:
        q = np.clip(np.round(x / self.scale) + self.zero_point, 0, self.qmax)
        return ((q - self.zero_point) * self.scale).astype(np.float32)

    def to_json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "bits": self.bits}


def act_params(lo: float, hi: float, bits: int) -> ActQuant:
    """Asymmetric scale/zero point covering [lo, hi] (always including 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    qmax = 2**bits - 1
    scale = max((hi - lo) / qmax, 1e-8)
    zp = int(np.clip(np.round(-lo / scale), 0, qmax))
    return ActQuant(float(np.float32(scale)), zp, bits)


def choose_act_range(samples: np.ndarray, lo: float, hi: float, bits: int, method: str = "mse",
                     percentile: float = 99.99) -> ActQuant:
    """Pick the activation range from observed samples and the exact min/max.

    ``minmax``: [min, max]. ``percentile``: [P_(100-p), P_p] of the samples. ``mse``: shrink
    [min, max] by a clipping ratio (each side independently on a coarse grid) minimizing
    E[(x̂ − x)²] over the samples.
    """
    if method == "minmax" or samples.size == 0:
        return act_params(lo, hi, bits)
    if method == "percentile":
        return act_params(np.percentile(samples, 100 - percentile), np.percentile(samples, percentile), bits)
    if method != "mse":
        raise ValueError(f"unknown range method {method!r}")
    best, best_err = act_params(lo, hi, bits), np.inf
    ratios = np.linspace(0.2, 1.0, 17)
    for rl in ratios if lo < 0 else [1.0]:
        for rh in ratios:
            q = act_params(lo * rl, hi * rh, bits)
            err = float(np.mean((q.fake(samples) - samples) ** 2))
            if err < best_err:
                best, best_err = q, err
    return best


def weight_scales(w: np.ndarray, bits: int, axis: int, method: str = "mse") -> np.ndarray:
    """Per-output-channel symmetric scales [C_out] (float32). ``mse`` searches a clipping ratio per channel."""
    wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    qmax = weight_qmax(bits)
    amax = np.maximum(np.abs(wc).max(1), 1e-12)
    if method == "minmax":
        return (amax / qmax).astype(np.float32)
    best = amax / qmax
    best_err = np.full(len(wc), np.inf)
    for r in CLIP_RATIOS:
        s = amax * r / qmax
        err = ((np.clip(np.round(wc / s[:, None]), -qmax, qmax) * s[:, None] - wc) ** 2).sum(1)
        better = err < best_err
        best[better], best_err[better] = s[better], err[better]
    return best.astype(np.float32)


def quantize_weight(w: np.ndarray, scales: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Round to nearest on the symmetric grid: int8 array of w's shape."""
    qmax = weight_qmax(bits)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.round(w / scales.reshape(shape)), -qmax, qmax).astype(np.int8)


def gptq(w2d: np.ndarray, H: np.ndarray, scales: np.ndarray, bits: int, damp: float = 0.01,
         block: int = 128) -> np.ndarray:
    """GPTQ (Frantar et al., 2023): quantize columns in order, compensating each column's rounding
    error on the not-yet-quantized columns through the inverse Hessian of the layer's loss.

    w2d [C_out, K] (K = C_in·k_h·k_w for conv, in the unfolded order), H = E[x xᵀ] [K, K] of the
    layer's inputs, scales [C_out]. Minimizes ‖(W − Ŵ) X‖² column by column (Algorithm 1):
      H⁻¹ = Cholesky(inverse(H + λI))ᵀ (upper);  for column j: q_j = Q(w_j);
      e = (w_j − q_j) / [H⁻¹]_jj;  W[:, j+1:] −= e · [H⁻¹]_{j, j+1:}
    Returns the integer weights [C_out, K] (int8).
    """
    W = w2d.astype(np.float64).copy()
    K = W.shape[1]
    H = H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper triangular
    qmax = weight_qmax(bits)
    s = scales.astype(np.float64)
    Q = np.zeros_like(W)
    for b0 in range(0, K, block):
        b1 = min(K, b0 + block)
        Wb = W[:, b0:b1].copy()
        Err = np.zeros_like(Wb)
        Hb = Hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = Wb[:, j]
            q = np.clip(np.round(col / s), -qmax, qmax)
            Q[:, b0 + j] = q
            err = (col - q * s) / Hb[j, j]
            Wb[:, j:] -= np.outer(err, Hb[j, j:])
            Err[:, j] = err
        W[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    return Q.astype(np.int8)
