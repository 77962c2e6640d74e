"""PTQD's correction fit and the step-aware mixed-precision plan (numpy; the collection step runs
the torch models).

Per precision and per timestep t of the calibrated schedule, with ε the FP noise prediction and
Δ = ε_q − ε the quantized model's error on the same x_t (both after classifier-free guidance,
along FP trajectories):

  k_t        least-squares slope of Δ on ε, with intercept, over all elements; a negative slope
             becomes 0 (dividing by 1 + k < 1 would amplify the residual)
  bias_t[c]  per latent channel mean of Δ − k_t·ε. That is what makes the corrected prediction
             (ε_q − bias_t)/(1 + k_t) unbiased; it equals the mean of Δ when ε is centred, as
             the PTQD reference computes it
  σ_q,t      mean over samples of the per-sample std of Δ − k_t·ε − bias_t[c]: the noise the
             correction cannot remove (the bias is subtracted first, because the runtime removes
             it; otherwise channel-to-channel bias differences would count as noise)

The fit uses part of the samples; the rest (held out) measure what it achieves: the share of
the error variance the linear model explains, and the error MSE before and after correction.

The plan (step-aware mixed precision, PTQD §3.4): at each step, the quantization noise must
be small next to the signal the sample still carries. Both sides are power ratios:

  SNR_Q(p, t) = ‖ε‖² / ‖ε̂_p − ε‖²     (noise prediction vs the error left after correction)
  SNR_F(t)    = ᾱ_t / (1 − ᾱ_t)          (signal vs noise in x_t)

and step t runs the cheapest precision p (fewest BOPs) with SNR_Q(p, t) ≥ margin · SNR_F(t); if
none qualifies, the one with the best SNR_Q. Early steps (x_t mostly noise) get the low-bit
engines, the last steps (x_t mostly signal) the high-bit ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptqd.runtime.correction import as_t


# The fitted slope is clamped from below at K_FLOOR (see the module doc). Measured with the slope left
# negative (benchmarks/correction_negative_k.py, paper-like recipe, demo, 500 samples, seeds 2 and 3): + k
# alone made every row worse at η 0 (w4a8 FD vs FP 42.3 -> 50.3/51.3, PSNR -0.3/-0.4 dB; w4a4 FD 72-77 -> 101-103).
K_FLOOR = 0.0


@dataclass
class StepFit:
    k: float
    k_raw: float  # the slope before clamping at 0
    bias: np.ndarray  # [C]
    sigma_q: float

    def corrected_error(self, eps: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """ε̂ − ε = (Δ − k·ε − bias) / (1 + k)."""
        return (delta - self.k * eps - _chan(self.bias, eps.ndim)) / (1.0 + self.k)

    def to_json(self) -> dict:
        return {"k": self.k, "k_raw": self.k_raw, "bias": [float(b) for b in self.bias], "sigma_q": self.sigma_q}


def _chan(v: np.ndarray, ndim: int) -> np.ndarray:
    return np.asarray(v).reshape((1, -1) + (1,) * (ndim - 2))


def fit_step(eps: np.ndarray, delta: np.ndarray) -> StepFit:
    """Fit k_t, bias_t[c], σ_q,t on ε and Δ of shape [N, C, ...] (N samples, C latent channels)."""
    e = np.asarray(eps, np.float64)
    d = np.asarray(delta, np.float64)
    if e.shape != d.shape or e.ndim < 2:
        raise ValueError(f"eps and delta must have the same shape [N, C, ...], got {e.shape} and {d.shape}")
    ec, dc = e - e.mean(), d - d.mean()
    var = float((ec * ec).mean())
    k_raw = float((ec * dc).mean() / var) if var > 0 else 0.0
    k = max(k_raw, K_FLOOR)
    resid = d - k * e
    axes = (0,) + tuple(range(2, e.ndim))
    bias = resid.mean(axis=axes)
    r = (resid - _chan(bias, e.ndim)).reshape(len(e), -1)
    sigma_q = float(r.std(axis=1).mean())
    return StepFit(k, k_raw, bias, sigma_q)


def assess(fit: StepFit, eps: np.ndarray, delta: np.ndarray) -> dict:
    """What the fit achieves on (held-out) samples."""
    e = np.asarray(eps, np.float64)
    d = np.asarray(delta, np.float64)
    lin = d - fit.k * e - _chan(fit.bias, e.ndim)
    after = fit.corrected_error(e, d)
    dvar = float(((d - d.mean()) ** 2).sum())
    e2 = float((e * e).sum())
    return {
        "explained_variance": 1.0 - float((lin * lin).sum()) / dvar if dvar > 0 else 0.0,
        "mse_uncorrected": float((d * d).mean()),
        "mse_corrected": float((after * after).mean()),
        "snr_q_uncorrected": e2 / max(float((d * d).sum()), 1e-30),
        "snr_q": e2 / max(float((after * after).sum()), 1e-30),
    }


def holdout_split(eps_steps, delta_steps, timesteps, holdout: int):
    """Per step (t, ε, Δ, cut): the fit uses samples [:cut], the held-out check [cut:] (the last ``holdout``)."""
    for t, e, d in zip(timesteps, eps_steps, delta_steps):
        n = len(e)
        if not 0 <= holdout < n:
            raise ValueError(f"holdout must be in [0, {n - 1}] samples, got {holdout}")
        yield t, e, d, n - holdout


def fit_precision(eps_steps: list[np.ndarray], delta_steps: list[np.ndarray], timesteps, holdout: int,
                  gate: bool = True) -> dict:
    """Per step: fit on samples [:-holdout], assess on [-holdout:] (and on the fit samples).

    ``gate``: a correction part is kept at a step only if it lowers the held-out error (as GPTQ is
    kept per layer only if it beats nearest rounding): with an error that is nearly uncorrelated
    with ε, a noisy k or bias would otherwise add error. The raw fit stays in the record.
    Returns {"steps": [{"t", "k", "bias", "sigma_q", "gate", "raw": {...}, "fit", "holdout"}, ...]}."""
    rows = []
    for t, e, d, cut in holdout_split(eps_steps, delta_steps, timesteps, holdout):
        f = fit_step(e[:cut], d[:cut])
        row = {"t": as_t(t), **f.to_json(), "gate": "k+bias", "raw": f.to_json(), "fit": assess(f, e[:cut], d[:cut])}
        if holdout:
            row["holdout"] = assess(f, e[cut:], d[cut:])
            if gate:
                zero = np.zeros_like(f.bias)
                variants = {"none": StepFit(0.0, f.k_raw, zero, f.sigma_q), "k": StepFit(f.k, f.k_raw, zero, f.sigma_q),
                            "bias": StepFit(0.0, f.k_raw, f.bias, f.sigma_q), "k+bias": f}
                mse = {name: assess(v, e[cut:], d[cut:])["mse_corrected"] for name, v in variants.items()}
                best = min(mse, key=lambda name: (mse[name], len(name)))
                g = variants[best]
                row.update({"k": g.k, "bias": [float(b) for b in g.bias], "gate": best,
                            "holdout_gated": assess(g, e[cut:], d[cut:])})
        rows.append(row)
    return {"steps": rows}


def sample_snr(alphas_cumprod: np.ndarray, timesteps) -> list[float]:
    """SNR_F(t) = ᾱ_t / (1 − ᾱ_t); ᾱ linear between integer timesteps (σ-space samplers visit fractional t)."""
    a = np.asarray(alphas_cumprod, np.float64)
    ab = [float(np.interp(float(t), np.arange(len(a)), a)) for t in timesteps]
    return [x / (1.0 - x) for x in ab]


def make_plan(corrections: dict[str, dict], cost: dict[str, float], alphas_cumprod, margin: float = 1.0,
              split: str = "holdout") -> dict:
    """Cheapest precision per step whose corrected SNR_Q clears margin·SNR_F (see the module doc).

    ``corrections``: precision -> fit_precision() result; ``cost``: precision -> BOPs per forward."""
    precs = sorted(corrections, key=lambda p: cost[p])
    first = corrections[precs[0]]["steps"]
    ts = [s["t"] for s in first]
    snr_f = sample_snr(alphas_cumprod, ts)
    key = {"holdout": "holdout_gated"}.get(split, split)
    curves = {p: [s.get(key, s.get(split, s["fit"]))["snr_q"] for s in corrections[p]["steps"]] for p in precs}
    steps = []
    for i, t in enumerate(ts):
        ok = [p for p in precs if curves[p][i] >= margin * snr_f[i]]
        p = ok[0] if ok else max(precs, key=lambda q: curves[q][i])
        steps.append({"t": as_t(t), "precision": p, "snr_f": snr_f[i], "snr_q": {q: curves[q][i] for q in precs},
                      "qualified": bool(ok)})
    return {"criterion": f"cheapest precision with SNR_Q(p, t) >= {margin:g} * SNR_F(t) ({split} samples), "
                         "else the best SNR_Q; SNR_Q = |eps|^2 / |corrected eps - eps|^2, SNR_F = abar/(1-abar)",
            "margin": margin, "precisions_by_cost": precs, "cost_bops": {p: cost[p] for p in precs}, "steps": steps}


def collect(fp_runner, quant_runner_at: dict, facts, class_embedding, labels: np.ndarray, seed: int, cfg,
            batch: int = 64, progress=None, start: int = 0):
    """Run FP trajectories of ``cfg``'s sampler; at every UNet call, every quantized model sees the same x_t.

    ``quant_runner_at``: precision -> callable(timestep) -> runner (timestep buckets have one model each).
    Returns (timesteps, [ε per timestep, N×C×H×W], {precision: [Δ per timestep]}), one entry per distinct
    timestep in the order the sampler visits them (PNDM's second call at its repeated timestep, on the corrected
    x, is not kept: the first, on the provisional x, stands for it),
    ε and Δ after classifier-free guidance, as the sampler uses them. ``labels[k]`` is trajectory
    ``start + k`` (its noise seed): a shard of a longer run."""
    from ptqd.runtime.pipeline import guided_eps, sample_latents

    calls = trajectory_timesteps(facts, cfg, distinct=False)
    keep = set(first_calls(calls))
    eps: list[list[np.ndarray]] = [[] for _ in calls]
    delta = {p: [[] for _ in calls] for p in quant_runner_at}
    for s0 in range(0, len(labels), batch):
        idx = np.arange(s0, min(len(labels), s0 + batch))

        def observe(i, t, x, ctx, e_fp, idx=idx):
            if i in keep:
                eps[i].append(e_fp)
                for p, runner_at in quant_runner_at.items():
                    delta[p][i].append(guided_eps(runner_at(t), x, t, ctx) - e_fp)
                if progress is not None:
                    progress.update(len(idx))

        sample_latents(fp_runner, facts, class_embedding, labels[idx], start + idx, seed, cfg, observe=observe)
    order = sorted(keep)
    return ([calls[i] for i in order], [np.concatenate(eps[i]) for i in order],
            {p: [np.concatenate(v[i]) for i in order] for p, v in delta.items()})


def first_calls(timesteps) -> list[int]:
    """Indices of the first UNet call at each distinct timestep."""
    seen: set = set()
    out = []
    for i, t in enumerate(timesteps):
        if t not in seen:
            seen.add(t)
            out.append(i)
    return out


def trajectory_timesteps(facts, cfg, distinct: bool = True) -> list:
    """The timesteps ``cfg``'s sampler visits (DDIM on the calibrated spacing where ``cfg.spec`` is None):
    one per UNet call, or with ``distinct`` one per distinct timestep (what the fit, the gate and the plan
    key on)."""
    from ptqd.runtime.pipeline import scheduler_for

    ts = [as_t(t) for t in scheduler_for(facts, cfg).timesteps]
    return [ts[i] for i in first_calls(ts)] if distinct else ts


def resumable(cfg) -> bool:
    """Whether ``sample_latents(start=(i, x))`` can resume ``cfg``'s sampler mid-trajectory (DDIM only:
    multistep samplers keep history)."""
    return cfg.spec is None or cfg.spec.cls == "DDIMScheduler"


def budget_plan(damage: dict[str, list[float]], cost: dict[str, float], reference: str, budget: float) -> list[str]:
    """Measured step-aware plan under a BOPs budget.

    ``damage[p][i]``: increase of the final-sample error when step i alone runs p instead of
    ``reference`` (negative: p helps). Start with ``reference`` everywhere; while the mean cost per
    step exceeds ``budget`` × cost(reference), downgrade the step that loses least error per BOP
    saved; then spend what is left of the budget on the upgrades that remove most error per BOP.
    Errors of different steps are taken as additive (small perturbations)."""
    steps = len(next(iter(damage.values())))
    plan = [reference] * steps
    limit = budget * cost[reference] * steps

    def total():
        return sum(cost[p] for p in plan)

    def dmg(i, p):
        return 0.0 if p == reference else damage[p][i]

    while total() > limit + 1e-9:
        moves = [((dmg(i, p) - dmg(i, plan[i])) / (cost[plan[i]] - cost[p]), i, p)
                 for i in range(steps) for p in cost if cost[p] < cost[plan[i]]]
        if not moves:
            raise ValueError(f"no plan fits a budget of {budget:g} x {reference}: every step already runs the "
                             "cheapest precision")
        _, i, p = min(moves)
        plan[i] = p
    while True:
        moves = [((dmg(i, p) - dmg(i, plan[i])) / (cost[p] - cost[plan[i]]), i, p)
                 for i in range(steps) for p in cost
                 if cost[p] > cost[plan[i]] and dmg(i, p) < dmg(i, plan[i])
                 and total() - cost[plan[i]] + cost[p] <= limit + 1e-9]
        if not moves:
            return plan
        _, i, p = min(moves)
        plan[i] = p


def fit_conditional_step(eps: np.ndarray, delta: np.ndarray) -> dict:
    """Conditional correction (in the spirit of D2-DPM): per latent channel c, the least-squares
    affine model of the error given what the runtime sees, E[Δ | ε_q] ≈ a_c·ε_q + b_c with
    ε_q = ε + Δ, over all samples and positions. The runtime then uses ε̂ = ε_q − a_c·ε_q − b_c,
    whose error is the residual Δ − a_c·ε_q − b_c; σ_q is its std (mean over samples of the
    per-sample std), the noise VSC accounts for.

    PTQD regresses Δ on ε, which the runtime never has; this regresses on ε_q, so the removed part
    is the conditional mean the runtime can actually compute (no division by 1 + k)."""
    e = np.asarray(eps, np.float64)
    d = np.asarray(delta, np.float64)
    if e.shape != d.shape or e.ndim < 2:
        raise ValueError(f"eps and delta must have the same shape [N, C, ...], got {e.shape} and {d.shape}")
    q = e + d
    axes = (0,) + tuple(range(2, e.ndim))
    qm, dm = q.mean(axis=axes, keepdims=True), d.mean(axis=axes, keepdims=True)
    var = ((q - qm) ** 2).mean(axis=axes, keepdims=True)
    cov = ((q - qm) * (d - dm)).mean(axis=axes, keepdims=True)
    a = np.where(var > 0, cov / np.where(var > 0, var, 1.0), 0.0)
    b = dm - a * qm
    r = (d - a * q - b).reshape(len(e), -1)
    return {"a": [float(v) for v in a.reshape(-1)], "b": [float(v) for v in b.reshape(-1)],
            "sigma_q": float(r.std(axis=1).mean())}


def conditional_error(step: dict, eps: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """ε̂ − ε under the conditional correction: Δ − a·ε_q − b."""
    e = np.asarray(eps, np.float64)
    d = np.asarray(delta, np.float64)
    q = e + d
    return d - _chan(np.array(step["a"]), e.ndim) * q - _chan(np.array(step["b"]), e.ndim)


def fit_conditional(eps_steps: list[np.ndarray], delta_steps: list[np.ndarray], timesteps, holdout: int) -> dict:
    """Per step: fit the conditional correction on samples [:-holdout], measure the ε error on the rest.
    Returns {"steps": [{"t", "a": [C], "b": [C], "sigma_q", "holdout": {mse_uncorrected, mse_corrected}}]}."""
    rows = []
    for t, e, d, cut in holdout_split(eps_steps, delta_steps, timesteps, holdout):
        row = {"t": as_t(t), **fit_conditional_step(e[:cut], d[:cut])}
        if holdout:
            after = conditional_error(row, e[cut:], d[cut:])
            row["holdout"] = {"mse_uncorrected": float((np.asarray(d[cut:], np.float64) ** 2).mean()),
                              "mse_corrected": float((after * after).mean())}
        rows.append(row)
    return {"steps": rows}
