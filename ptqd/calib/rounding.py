"""Weight scales, rounding and layer error in torch (float32, blocked; CPU or CUDA).

These are the fast twins of the numpy references in :mod:`ptqd.calib.quant` (same formulas, checked
against them in tests/calib/test_quant.py). Everything here is BLAS-shaped: the only Python loop
is GPTQ's walk over the K columns of a layer, each step a handful of [C_out x block] vector ops.

Cost per layer with C = C_out, K = C_in·k_h·k_w:
  scales        36 clipping ratios x C·min(K, 2048) elementwise
  H⁻¹ factor    one Cholesky of H and one triangular inverse: 2K³/3 flops (the upper Cholesky
                factor of H⁻¹ is the reversed inverse of the Cholesky factor of the reversed H,
                so no full inverse and no second factorization are needed)
  GPTQ          C·K² flops in [C x 128] @ [128 x K] blocks
  layer error   tr(ΔW H ΔWᵀ) = Σ (ΔW H) ∘ ΔW: C·K² flops, one matmul
"""

from __future__ import annotations

import numpy as np

CLIP_RATIOS = np.linspace(0.3, 1.0, 36)
SCALE_SEARCH_COLUMNS = 2048  # weights per channel the clipping search evaluates (all of them up to this)


def weight_scales(w, qmax: int, method: str = "mse"):
    """Per-output-channel symmetric scales [C] (float32) of w [C, K] (torch). ``mse``: the clipping
    ratio (of the channel's max |w|) minimizing Σ (Q(w) − w)² per channel."""
    import torch

    amax = w.abs().amax(dim=1).clamp_min(1e-12)
    best = amax / qmax
    if method == "minmax":
        return best
    if w.shape[1] > SCALE_SEARCH_COLUMNS:  # the error of a clipping ratio, estimated on evenly spaced columns
        w = w[:, torch.linspace(0, w.shape[1] - 1, SCALE_SEARCH_COLUMNS, device=w.device).round().long()]
    best_err = torch.full_like(amax, float("inf"))
    for r in CLIP_RATIOS:
        s = amax * float(r) / qmax
        err = ((torch.clamp(torch.round(w / s[:, None]), -qmax, qmax) * s[:, None] - w) ** 2).sum(1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def quantize_nearest(w, scales, qmax: int):
    import torch

    return torch.clamp(torch.round(w / scales[:, None]), -qmax, qmax)


def layer_error(w, deq, H) -> float:
    """Relative output error of a weight change on the observed inputs: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    d = w - deq
    num = float(((d @ H) * d).sum())
    den = float(((w @ H) * w).sum())
    return num / max(den, 1e-30)


def inverse_hessian_factor(H, damp: float = 0.01):
    """U upper triangular with H_d⁻¹ = Uᵀ U, H_d = H + λI (λ = damp · mean diag H; dead inputs get 1).

    With P the reversal permutation and P H_d P = L Lᵀ: H_d⁻¹ = (P L⁻ᵀ P)(P L⁻¹ P), so U = P L⁻¹ P.
    Returns (U, dead mask). A matrix that is not positive definite in float32 gets 10x the damping
    (at most three times) before giving up."""
    import torch

    # Memory matters at K = 17,280 (1.2 GB per matrix): at most two K x K temporaries live at once.
    dead = torch.diag(H) <= 0
    diag = torch.where(dead, torch.ones_like(torch.diag(H)), torch.diag(H))
    mean_diag = float(diag.mean())
    for attempt in range(4):
        Hd = torch.flip(H, dims=(0, 1))  # P H P, a copy: H itself stays as the caller's
        Hd.diagonal().copy_(torch.flip(diag, dims=(0,)) + (damp * 10**attempt) * mean_diag)
        if dead.any():
            rd = torch.flip(dead, dims=(0,))
            Hd[rd, :] = 0.0
            Hd[:, rd] = 0.0
            Hd.diagonal()[rd] = 1.0 + (damp * 10**attempt) * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if int(info) == 0:
            break
    else:
        raise ValueError("the layer's input second moment is not positive definite even with 10x damping")
    if L.device.type == "cpu":
        from scipy.linalg import lapack

        fn = lapack.strtri if L.dtype == torch.float32 else lapack.dtrtri
        inv, info = fn(L.numpy(), lower=1, overwrite_c=1)
        if info != 0:
            raise ValueError(f"triangular inverse failed (LAPACK info {info})")
        del L
        Linv = torch.from_numpy(inv).tril_()
    else:
        Linv = torch.linalg.solve_triangular(L, torch.eye(len(L), dtype=L.dtype, device=L.device), upper=False)
        del L
    return torch.flip(Linv, dims=(0, 1)), dead


def gptq(w, H, scales, qmax, damp: float = 0.01, block: int = 128):
    """GPTQ (Frantar et al., 2023) on w [C, K] with H = E[x xᵀ] [K, K]: integer weights [C, K] (float tensor).

    Columns are quantized in order; each column's rounding error is compensated on the columns not yet
    quantized through the inverse Hessian (Algorithm 1, with lazy batch updates of ``block`` columns):
      q_j = Q(w_j);  e = (w_j − s·q_j) / U_jj;  W[:, j+1:] −= e · U_{j, j+1:}
    ``qmax`` may be a tensor [C] (rows on different grids share one pass over the columns)."""
    import torch

    W = w.clone()
    U, dead = inverse_hessian_factor(H, damp)
    W[:, dead] = 0.0
    K = W.shape[1]
    s = scales[:, None]
    hi = (torch.as_tensor(qmax, dtype=W.dtype, device=W.device) * torch.ones_like(scales))[:, None]
    lo = -hi
    Q = torch.zeros_like(W)
    threads = torch.get_num_threads()
    for b0 in range(0, K, block):
        b1 = min(K, b0 + block)
        Wb = W[:, b0:b1].clone()
        Qb = torch.empty_like(Wb)
        Err = torch.empty_like(Wb)
        Ub = U[b0:b1, b0:b1]
        # the column walk is many tiny ops: on the CPU one thread runs them fastest (with more, every op
        # pays a thread-pool barrier, 10-40x slower when another process holds a core)
        if W.device.type == "cpu":
            torch.set_num_threads(1)
        try:
            for j in range(b1 - b0):
                col = Wb[:, j:j + 1]
                q = torch.minimum(torch.maximum(torch.round(col / s), lo), hi)
                Qb[:, j:j + 1] = q
                err = (col - q * s) / Ub[j, j]
                Wb[:, j + 1:] -= err @ Ub[j:j + 1, j + 1:]
                Err[:, j:j + 1] = err
        finally:
            torch.set_num_threads(threads)
        Q[:, b0:b1] = Qb
        if b1 < K:
            W[:, b1:] -= Err @ U[b0:b1, b1:]
    return Q


def per_tensor_scales(w, qmax: int, method: str = "mse"):
    """One symmetric scale for the whole tensor, repeated per output channel [C] (per-channel
    storage with equal scales: the engines' per-channel path, per-tensor numerics)."""
    s = weight_scales(w.reshape(1, -1), qmax, method)
    return s.expand(w.shape[0]).contiguous()


def round_layer(w2d: np.ndarray, H, grids: list[int], method: str, rounding: str, device,
                weights: str = "channel") -> dict:
    """{grid bits: (integer weights [C, K] int8, scales [C] float32, {"nearest": err, "gptq": err})} for one
    layer on each weight grid in ``grids``.

    ``H``: E[x xᵀ] as a torch tensor (or None: no error report, nearest rounding). All grids go through
    one GPTQ pass (their rows stacked), and GPTQ is kept per grid only where it beats nearest rounding
    on the layer's output error."""
    import torch

    w = torch.from_numpy(np.ascontiguousarray(w2d, np.float32)).to(device)
    qmaxes = [2 ** (g - 1) - 1 for g in grids]
    scale_fn = per_tensor_scales if weights == "tensor" else weight_scales
    scales = [scale_fn(w, qm, "minmax" if method == "minmax" else "mse") for qm in qmaxes]
    near = [quantize_nearest(w, s, qm) for s, qm in zip(scales, qmaxes)]
    errors: list[dict] = [{} for _ in grids]
    chosen = list(near)
    if H is not None:
        H = H.to(device=device, dtype=torch.float32)
        for e, q, s in zip(errors, near, scales):
            e["nearest"] = layer_error(w, q * s[:, None], H)
        if rounding == "gptq":
            C = len(w)
            qm = torch.cat([torch.full((C,), float(m), device=w.device) for m in qmaxes])
            stacked = gptq(w.repeat(len(grids), 1), H, torch.cat(scales), qm)
            for i, (e, s) in enumerate(zip(errors, scales)):
                q_g = stacked[i * C:(i + 1) * C]
                e["gptq"] = layer_error(w, q_g * s[:, None], H)
                if e["gptq"] <= e["nearest"]:  # never worse than nearest
                    chosen[i] = q_g
    return {g: (q.to(torch.int8).cpu().numpy(), s.float().cpu().numpy(), e)
            for g, q, s, e in zip(grids, chosen, scales, errors)}
