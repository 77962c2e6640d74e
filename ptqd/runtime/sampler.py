"""DDIM (Song et al., 2021) in numpy, with eta and classifier-free guidance.

Follows the diffusers scheduler contract: ``set_timesteps(n)``, then ``timesteps`` (descending)
and ``step(eps, t, x)``. With ``eta = 0`` sampling is deterministic (DDIM); with ``eta = 1`` the
added noise has the DDPM posterior variance at the chosen steps.

Timestep spacing: ``"compvis"`` (default for CompVis models) is ``make_ddim_timesteps('uniform')``
of latent-diffusion: t = 1, 1 + c, 1 + 2c, ... with c = T // n, so 20 steps give 1, 51, ..., 951;
it equals diffusers' ``DDIMScheduler(timestep_spacing="leading", steps_offset=1,
set_alpha_to_one=False)``. ``"leading"`` drops the offset (0, c, 2c, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    steps: int = 20
    eta: float = 0.0
    guidance: float = 1.0  # classifier-free guidance scale s: eps_u + s·(eps_c - eps_u); 1 = no guidance
    spacing: str = "compvis"
    vsc_direction: str = "sigma"  # direction term under VSC: "sigma" (σ_t, default) or "sigma_prime" (σ_t′)
    # the sampler (a ptqd.runtime.schedulers.SamplerSpec); None: DDIM on ``spacing``, what calibration uses
    spec: Any = None

    @property
    def sampler_name(self) -> str:
        return self.spec.name if self.spec is not None else "ddim"

    def validate(self, num_train_timesteps: int) -> None:
        from ptqd.errors import UserError
        from ptqd.validate import integer, real

        if self.spacing not in ("compvis", "leading"):
            raise UserError(f"spacing must be 'compvis' or 'leading', got {self.spacing!r}")
        # a spec's own limit is checked where the spec is made (runtime.loader.sampler_config)
        integer("--steps", self.steps, 1, max_steps(num_train_timesteps, self.spacing) if self.spec is None else None)
        real("--eta", self.eta)
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"--eta must be in [0, 1] (0 = DDIM, 1 = DDPM-like), got {self.eta}")
        if self.eta > 0 and self.spec is not None and self.spec.cls != "DDIMScheduler":
            raise UserError(f"--eta {self.eta:g}: η is DDIM's; {self.spec.name} takes no η (use --eta 0, or "
                            "--sampler ddim)")
        real("--guidance", self.guidance)
        if self.guidance < 0:
            raise UserError(f"--guidance must be >= 0, got {self.guidance}")
        if self.vsc_direction not in ("sigma", "sigma_prime"):
            raise UserError(f"vsc_direction must be 'sigma' or 'sigma_prime', got {self.vsc_direction!r}")


def max_steps(num_train_timesteps: int, spacing: str = "compvis") -> int:
    """The most DDIM steps a T-step schedule has: T, or T - 1 with CompVis' offset of 1 (its last
    timestep 1 + (n-1)·(T // n) must stay below T)."""
    return num_train_timesteps - (1 if spacing == "compvis" else 0)


class DDIMSampler:
    """Notation (DDIM paper, eq. 12), with ᾱ the cumulative product of (1 - β):

      x_t      the current latent                   ε          the (guided) noise prediction
      ᾱ_t      alphas_cumprod[t]                    ᾱ_prev     alphas_cumprod[t - T/n] (ᾱ_0 at the end)
      x̂_0      (x_t - √(1-ᾱ_t)·ε) / √ᾱ_t            predicted clean latent
      σ_t      η·√((1-ᾱ_prev)/(1-ᾱ_t))·√(1-ᾱ_t/ᾱ_prev)
      x_prev   √ᾱ_prev·x̂_0 + √(1-ᾱ_prev-σ_t²)·ε + σ_t·z,   z ~ N(0, I)

    Variance schedule calibration (PTQD): when ε carries a residual quantization noise of std r
    (after the correction, r = σ_q,t / (1 + k_t)), that noise reaches x_prev with ε's net
    coefficient λ_t = √(1-ᾱ_prev-σ_t²) − √(ᾱ_prev·(1-ᾱ_t)/ᾱ_t), i.e. as extra variance λ_t²·r².
    The sampler then injects only σ_t′² = max(σ_t² − λ_t²·r², 0) of fresh noise, so the total stays
    σ_t². The direction term keeps σ_t (not σ_t′): the residual noise takes the place of part of
    the fresh noise, so the deterministic part of the update must not change; with σ_t′ in the
    direction, λ_t itself would grow and the variance budget would no longer add up (the PTQD
    reference code does this; ``vsc_direction="sigma_prime"`` reproduces it for comparison).
    """

    def __init__(self, alphas_cumprod: np.ndarray, spacing: str = "compvis", steps_offset: int | None = None,
                 set_alpha_to_one: bool = False):
        if spacing not in ("compvis", "leading", "trailing", "linspace"):
            raise ValueError(f"spacing must be compvis, leading, trailing or linspace, got {spacing!r}")
        self.alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.spacing = spacing
        self.offset = 1 if spacing == "compvis" else int(steps_offset or 0) if spacing == "leading" else 0
        # ᾱ after the last step: ᾱ_0 (CompVis, Stable Diffusion) or 1 (diffusers' DDIM default)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else float(self.alphas_cumprod[0])
        self.timesteps: np.ndarray | None = None
        self.step_ratio = 0

    def max_steps(self) -> int:
        return self.num_train_timesteps - self.offset

    def set_timesteps(self, num_inference_steps: int) -> None:
        """diffusers' DDIMScheduler.set_timesteps for the spacing (``compvis`` = ``leading`` with offset 1)."""
        T, n = self.num_train_timesteps, num_inference_steps
        most = self.max_steps()
        if not 1 <= n <= most:
            raise ValueError(f"num_inference_steps must be in [1, {most}], got {n}")
        self.step_ratio = T // n
        if self.spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        elif self.spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            ts = (np.arange(n) * self.step_ratio + self.offset)[::-1]
        self.timesteps = ts.astype(np.int64).copy()

    def alphas(self, t: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) for the step at timestep t."""
        prev = t - self.step_ratio
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        return float(self.alphas_cumprod[t]), a_prev

    def sigma(self, t: int, eta: float) -> float:
        a_t, a_prev = self.alphas(t)
        return eta * float(np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))

    def eps_coefficient(self, t: int, eta: float) -> float:
        """λ_t: the net coefficient of ε in x_prev (x̂_0's −√(ᾱ_prev(1−ᾱ_t)/ᾱ_t) plus the direction's)."""
        a_t, a_prev = self.alphas(t)
        sigma = self.sigma(t, eta)
        return float(np.sqrt(max(1 - a_prev - sigma**2, 0.0)) - np.sqrt(a_prev * (1 - a_t) / a_t))

    def calibrated_sigma(self, t: int, eta: float, residual_std: float) -> float:
        """σ_t′ = √max(σ_t² − λ_t²·r², 0): the fresh noise left once the residual noise r is counted."""
        sigma = self.sigma(t, eta)
        lam = self.eps_coefficient(t, eta)
        return float(np.sqrt(max(sigma**2 - lam**2 * residual_std**2, 0.0)))

    def step(self, eps: np.ndarray, t: int, x: np.ndarray, eta: float = 0.0,
             noise: np.ndarray | None = None, residual_std: float = 0.0,
             vsc_direction: str = "sigma") -> tuple[np.ndarray, np.ndarray]:
        """One update x_t -> x_prev. Returns (x_prev, x̂_0). ``noise`` is required when eta > 0.

        ``residual_std``: std of the noise left in ``eps`` (VSC; 0 = the plain sampler)."""
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(n) before step()")
        a_t, a_prev = self.alphas(int(t))
        # 1. predicted x_0 (DDIM eq. 12, first term)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        # 2. σ_t (eq. 16) and the direction pointing to x_t (second term)
        sigma = self.sigma(int(t), eta)
        fresh = self.calibrated_sigma(int(t), eta, residual_std) if residual_std > 0 and sigma > 0 else sigma
        d_sigma = fresh if vsc_direction == "sigma_prime" else sigma
        direction = np.sqrt(max(1 - a_prev - d_sigma**2, 0.0)) * eps
        # 3. x_prev, plus fresh noise (third term) when stochastic
        x_prev = np.sqrt(a_prev) * x0 + direction
        sigma = fresh
        if sigma > 0:
            if noise is None:
                raise ValueError("eta > 0 needs the step's noise")
            x_prev = x_prev + sigma * noise
        return x_prev.astype(np.float32), x0.astype(np.float32)


class NoiseSource:
    """Per-sample seeded noise: sample i's noise depends only on (seed, i), never on the batch size,
    so the same seed pairs samples across engines and batchings."""

    def __init__(self, seed, indices: np.ndarray, shape: tuple[int, ...]):
        """``seed``: one seed, or one per sample (a served batch mixes requests)."""
        from ptqd.validate import integer

        seeds = [seed] * len(indices) if np.ndim(seed) == 0 else [int(s) for s in seed]
        if len(seeds) != len(indices):
            raise ValueError(f"{len(seeds)} seeds for {len(indices)} samples")
        for s in set(seeds):
            integer("--seed", s, 0)
        self.shape = shape
        self.rngs = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([s, int(i)])))
                     for s, i in zip(seeds, indices)]

    def draw(self) -> np.ndarray:
        return np.stack([r.standard_normal(self.shape, dtype=np.float32) for r in self.rngs])
