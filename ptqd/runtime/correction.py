"""PTQD at sampling time: the per-step noise correction, VSC, and engine switching by plan.

numpy only. The calibrator fits, per precision and per timestep t of the calibrated schedule
(``calib/correction.json``):

  k_t        slope of the quantization error Δ = ε_q − ε on ε (≥ 0)
  bias_t[c]  per latent channel mean of the error left after the slope, Δ − k_t·ε
  σ_q,t      std of what is left after both, Δ − k_t·ε − bias_t[c] (mean of per-sample stds)

and the runtime replaces the engine's ε_q by ε̂ = (ε_q − bias_t) / (1 + k_t), whose error is the
residual alone, scaled down: (Δ′ − bias_t) / (1 + k_t), of std r_t = σ_q,t / (1 + k_t). With
η > 0 the sampler counts r_t as part of its fresh noise (VSC, see ``DDIMSampler``).

Other step counts than the calibrated one: the coefficients are functions of t, not of the
step index (they describe the engine at that noise level), so they are interpolated linearly
in t between calibrated timesteps and held constant beyond the calibrated range. A plan is
likewise a precision per t: a timestep between calibrated ones takes the precision of the
nearest calibrated timestep (the higher precision on a tie).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

CORRECTION_PARTS = ("k", "bias", "vsc")


@dataclass(frozen=True)
class StepCorrection:
    k: float
    bias: np.ndarray  # [C]
    sigma_q: float

    def apply(self, eps_q: np.ndarray, use_k: bool = True, use_bias: bool = True) -> np.ndarray:
        e = eps_q
        if use_bias:
            e = e - self.bias.reshape((1, -1) + (1,) * (eps_q.ndim - 2)).astype(np.float32)
        if use_k:
            e = e / np.float32(1.0 + self.k)
        return e

    def residual_std(self, use_k: bool = True) -> float:
        return self.sigma_q / (1.0 + self.k) if use_k else self.sigma_q


@dataclass
class CorrectionTable:
    """One precision's coefficients over the calibrated timesteps (ascending t)."""

    t: np.ndarray  # [S] int
    k: np.ndarray  # [S]
    bias: np.ndarray  # [S, C]
    sigma_q: np.ndarray  # [S]

    @classmethod
    def from_json(cls, rec: dict) -> "CorrectionTable":
        steps = sorted(rec["steps"], key=lambda s: s["t"])
        return cls(np.array([s["t"] for s in steps], np.float64), np.array([s["k"] for s in steps], np.float64),
                   np.array([s["bias"] for s in steps], np.float64), np.array([s["sigma_q"] for s in steps], np.float64))

    def at(self, t: float) -> StepCorrection:
        """Coefficients at t: exact at calibrated timesteps, linear in t between, held beyond."""
        k = float(np.interp(t, self.t, self.k))
        sq = float(np.interp(t, self.t, self.sigma_q))
        bias = np.array([np.interp(t, self.t, self.bias[:, c]) for c in range(self.bias.shape[1])])
        return StepCorrection(k, bias, sq)


@dataclass
class Plan:
    """A precision per calibrated timestep (step-aware mixed precision)."""

    t: list[int]
    precision: list[str]
    rank: dict[str, int] = field(default_factory=dict)  # higher = more bits; breaks ties toward it

    @classmethod
    def from_json(cls, rec: dict) -> "Plan":
        """``{"steps": [{"t": 951, "precision": "w4a4"}, ...], "precisions_by_cost": [...]?}``; ValueError
        (saying what is wrong) for anything else."""
        steps = rec.get("steps") if isinstance(rec, dict) else None
        if not isinstance(steps, list) or not steps:
            raise ValueError('a plan needs a non-empty "steps" list')
        for i, s in enumerate(steps):
            t = s.get("t") if isinstance(s, dict) else None
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t < 2 ** 31:  # NaN fails it
                raise ValueError(f"steps[{i}] needs a timestep \"t\" (a number in [0, 2**31)), got {repr(t)[:60]}")
            if not isinstance(s.get("precision"), str) or not s["precision"]:
                raise ValueError(f"steps[{i}] needs a \"precision\" name, got {repr(s.get('precision'))[:60]}")
        by_cost = rec.get("precisions_by_cost", [])
        if not isinstance(by_cost, list) or not all(isinstance(p, str) for p in by_cost):
            raise ValueError('"precisions_by_cost" must be a list of precision names')
        return cls([int(s["t"]) for s in steps], [s["precision"] for s in steps],
                   {p: i for i, p in enumerate(by_cost)})

    @classmethod
    def fixed(cls, precision: str) -> "Plan":
        return cls([0], [precision])

    @property
    def precisions(self) -> list[str]:
        return sorted(set(self.precision), key=lambda p: self.rank.get(p, 0))

    def at(self, t: float) -> str:
        d = np.abs(np.asarray(self.t, np.float64) - t)
        best = np.flatnonzero(d == d.min())
        return max((self.precision[i] for i in best), key=lambda p: self.rank.get(p, 0))


class StepEngines:
    """What runs at each timestep: the plan's engine for t (every engine stays loaded, so switching
    is a dictionary lookup, never a reload) and, optionally, its PTQD correction."""

    def __init__(self, runners: dict, plan: Plan, corrections: dict[str, CorrectionTable] | None = None,
                 use: tuple[str, ...] = CORRECTION_PARTS):
        missing = [p for p in plan.precisions if p not in runners]
        if missing:
            raise ValueError(f"plan needs engines {missing}; loaded: {sorted(runners)}")
        bad = [u for u in use if u not in CORRECTION_PARTS]
        if bad:
            raise ValueError(f"unknown correction part(s) {bad}; choose from {CORRECTION_PARTS}")
        self.runners, self.plan, self.corrections, self.use = runners, plan, corrections or {}, tuple(use)
        self.switches = 0
        self._last: str | None = None

    def reset_switches(self) -> None:
        """Start counting engine switches afresh (one sampling run's worth)."""
        self.switches, self._last = 0, None

    def at(self, t: float):
        """(runner, StepCorrection or None) for timestep t."""
        p = self.plan.at(t)
        if self._last is not None and p != self._last:
            self.switches += 1
        self._last = p
        table = self.corrections.get(p)
        corr = table.at(t) if table is not None and self.use else None
        return self.runners[p], corr

    def correct(self, eps_q: np.ndarray, corr: StepCorrection | None) -> np.ndarray:
        if corr is None:
            return eps_q
        return corr.apply(eps_q, use_k="k" in self.use, use_bias="bias" in self.use)

    def residual_std(self, corr: StepCorrection | None) -> float:
        return corr.residual_std("k" in self.use) if corr is not None and "vsc" in self.use else 0.0

    def close(self) -> None:
        for r in self.runners.values():
            close = getattr(r, "close", None)
            if close:
                close()
