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

Which coefficients and parts (``StepEngines.use``; ``CorrectionTable.from_json(rec, applied=...)``):

  raw fit      ``--correction on`` (k, bias, VSC) and explicit parts: the fit as it came out
  conditional  part ``cond``: per channel ε̂ = ε_q − a_c·ε_q − b_c, the conditional mean of the
               error given ε_q removed (``calib.correction.fit_conditional``); replaces k and bias,
               its residual std σ_c,t is what VSC counts
  applied      ``--correction auto``: only the parts the end-to-end gate kept at each step
               (``calib.gate``; ``gate.steps[i].parts`` in correction.json), nothing where there is
               no gate record
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import numpy as np

CORRECTION_PARTS = ("k", "bias", "vsc", "cond")
PTQD_PARTS = ("k", "bias", "vsc")  # --correction on
CONDITIONAL_PARTS = ("cond", "vsc")  # --correction conditional


@dataclass(frozen=True)
class StepCorrection:
    k: float
    bias: np.ndarray  # [C]
    sigma_q: float
    a: np.ndarray | None = None  # [C] conditional slope on eps_q (None: not fitted)
    b: np.ndarray | None = None  # [C] conditional intercept
    sigma_c: float = 0.0  # residual std under the conditional correction
    parts: tuple[str, ...] | None = None  # the gate's parts at this step (None: no restriction)

    def apply(self, eps_q: np.ndarray, use_k: bool = True, use_bias: bool = True, use_cond: bool = False) -> np.ndarray:
        e = eps_q
        if use_cond and self.a is not None:
            shape = (1, -1) + (1,) * (eps_q.ndim - 2)
            return (e - self.a.reshape(shape).astype(np.float32) * e - self.b.reshape(shape).astype(np.float32))
        if use_bias:
            e = e - self.bias.reshape((1, -1) + (1,) * (eps_q.ndim - 2)).astype(np.float32)
        if use_k:
            e = e / np.float32(1.0 + self.k)
        return e

    def residual_std(self, use_k: bool = True, use_cond: bool = False) -> float:
        if use_cond and self.a is not None:
            return self.sigma_c
        return self.sigma_q / (1.0 + self.k) if use_k else self.sigma_q


def as_t(t) -> int | float:
    """A timestep as the records keep it: an int where it is whole (DDIM, PNDM, DPM-Solver), else the float
    (Euler's interpolated timesteps)."""
    t = float(t)
    return int(t) if t.is_integer() else t


@dataclass
class CorrectionTable:
    """One precision's coefficients over the calibrated timesteps (ascending t)."""

    t: np.ndarray  # [S] the fit's timesteps (whole for DDIM, PNDM and DPM-Solver; Euler's may be fractional)
    k: np.ndarray  # [S]
    bias: np.ndarray  # [S, C]
    sigma_q: np.ndarray  # [S]
    a: np.ndarray | None = None  # [S, C] conditional correction, when fitted
    b: np.ndarray | None = None  # [S, C]
    sigma_c: np.ndarray | None = None  # [S]
    parts: list[tuple[str, ...]] | None = None  # [S] the gate's parts per step; None: no restriction

    @classmethod
    def from_json(cls, rec: dict, applied: bool = False) -> "CorrectionTable":
        """One precision's record of correction.json. The raw fit (``steps[i].raw`` when present: the
        per-step held-out ε gate's choice stays in ``k``/``bias`` as a record only), the conditional
        fit when there is one, and with ``applied`` the gate's parts per step (none without a gate)."""
        steps = sorted(rec["steps"], key=lambda s: s["t"])
        raw = [s.get("raw", s) for s in steps]
        tab = cls(np.array([s["t"] for s in steps], np.float64), np.array([r["k"] for r in raw], np.float64),
                  np.array([r["bias"] for r in raw], np.float64), np.array([r["sigma_q"] for r in raw], np.float64))
        cond = rec.get("conditional")
        if cond:
            cs = {float(c["t"]): c for c in cond["steps"]}
            if set(cs) == {float(t) for t in tab.t}:
                rows = [cs[float(t)] for t in tab.t]
                tab.a = np.array([c["a"] for c in rows], np.float64)
                tab.b = np.array([c["b"] for c in rows], np.float64)
                tab.sigma_c = np.array([c["sigma_q"] for c in rows], np.float64)
        if applied:
            gs = {float(g["t"]): tuple(g["parts"]) for g in (rec.get("gate") or {}).get("steps", [])}
            tab.parts = [gs.get(float(t), ()) for t in tab.t]
        return tab

    def at(self, t: float) -> StepCorrection:
        """Coefficients at t: exact at calibrated timesteps, linear in t between, held beyond; the
        gate's parts of the nearest calibrated timestep."""
        k = float(np.interp(t, self.t, self.k))
        sq = float(np.interp(t, self.t, self.sigma_q))
        bias = np.array([np.interp(t, self.t, self.bias[:, c]) for c in range(self.bias.shape[1])])
        a = b = None
        sc = 0.0
        if self.a is not None:
            a = np.array([np.interp(t, self.t, self.a[:, c]) for c in range(self.a.shape[1])])
            b = np.array([np.interp(t, self.t, self.b[:, c]) for c in range(self.b.shape[1])])
            sc = float(np.interp(t, self.t, self.sigma_c))
        parts = None
        if self.parts is not None:
            parts = self.parts[int(np.argmin(np.abs(self.t - t)))]
        return StepCorrection(k, bias, sq, a, b, sc, parts)


@dataclass
class Plan:
    """A precision per calibrated timestep (step-aware mixed precision)."""

    t: list[int | float]
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
        return cls([as_t(s["t"]) for s in steps], [s["precision"] for s in steps],
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
                 use: tuple[str, ...] = PTQD_PARTS):
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

    def parts(self, corr: StepCorrection | None) -> tuple[str, ...]:
        """The parts applied at a step: ``use``, restricted to the gate's choice where the table has one."""
        if corr is None:
            return ()
        return tuple(u for u in self.use if corr.parts is None or u in corr.parts)

    def correct(self, eps_q: np.ndarray, corr: StepCorrection | None) -> np.ndarray:
        use = self.parts(corr)
        if not use:
            return eps_q
        return corr.apply(eps_q, use_k="k" in use, use_bias="bias" in use, use_cond="cond" in use)

    def residual_std(self, corr: StepCorrection | None) -> float:
        use = self.parts(corr)
        return corr.residual_std("k" in use, "cond" in use) if "vsc" in use else 0.0

    def close(self) -> None:
        for r in self.runners.values():
            close = getattr(r, "close", None)
            if close:
                close()
