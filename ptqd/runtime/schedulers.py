"""The samplers a diffusers pipeline names, in numpy: DDIM, PNDM (PLMS), DPM-Solver++ multistep (order 1
or 2, optionally on Karras sigmas), Euler and Euler ancestral.

Each reproduces the diffusers scheduler of the same name and config step by step (tests compare whole
trajectories on the same inputs). The UNet ptqd exports always predicts ε (a v-prediction UNet is
converted inside the graph), so every scheduler here takes ε whatever the source model predicted.

A bundle made from a diffusers pipeline keeps its scheduler's class and config (``facts.sampler``);
sampling uses it unless ``--sampler`` names another, which is then configured as diffusers'
``OtherScheduler.from_config(pipe.scheduler.config)`` would be: the keys it knows come from the
pipeline's config, the rest are its defaults. CompVis and demo bundles sample with DDIM on CompVis
spacing (``leading``, ``steps_offset=1``, ``set_alpha_to_one=False``).

Notation, in the σ parametrisation of Karras et al. (EDM) that Euler and DPM-Solver use:
σ_t = √((1 − ᾱ_t)/ᾱ_t), the sample is x = x_t·√(1 + σ²) (``init_noise_sigma`` scales the initial
noise, ``scale_model_input`` undoes it for the UNet), and for ε-prediction x̂₀ = x − σ·ε.

PTQD's correction acts on ε, so it applies to every sampler; its coefficients are functions of t
(``runtime.correction``), read at the timesteps the sampler visits. VSC (variance schedule calibration)
needs a sampler that injects fresh noise, whose share it reduces by the residual quantization noise:
DDIM with η > 0 (``DDIMSampler``) and Euler ancestral (here). The other samplers are deterministic; VSC
does not apply to them and is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ptqd.errors import UserError
from ptqd.runtime.sampler import DDIMSampler

# ptqd's sampler names -> the diffusers class each reproduces (a "-karras" suffix: Karras sigmas)
SAMPLERS = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "dpm++1": "DPMSolverMultistepScheduler",
            "dpm++2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
            "euler-a": "EulerAncestralDiscreteScheduler"}
KARRAS = ("dpm++1", "dpm++2m", "euler")
SAMPLER_CHOICES = tuple(SAMPLERS) + tuple(f"{n}-karras" for n in KARRAS)

# diffusers' defaults (0.3x-0.4x) of the config keys each scheduler reads; from_config semantics: a stored
# config's key overrides the default where the class knows it
DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
                      "clip_sample": True, "thresholding": False, "rescale_betas_zero_snr": False},
    "PNDMScheduler": {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": False,
                      "skip_prk_steps": False},
    "DPMSolverMultistepScheduler": {
        "timestep_spacing": "linspace", "steps_offset": 0, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "final_sigmas_type": "zero", "thresholding": False, "use_lu_lambdas": False, "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_flow_sigmas": False, "variance_type": None, "lambda_min_clipped": None,
        "rescale_betas_zero_snr": False},
    "EulerDiscreteScheduler": {
        "timestep_spacing": "linspace", "steps_offset": 0, "interpolation_type": "linear", "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "sigma_min": None, "sigma_max": None,
        "timestep_type": "discrete", "final_sigmas_type": "zero", "rescale_betas_zero_snr": False},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "linspace", "steps_offset": 0,
                                        "rescale_betas_zero_snr": False},
}
# what ptqd reproduces of each key that changes the result (anything else: not supported)
SUPPORTED: dict[str, tuple] = {
    "timestep_spacing": ("leading", "trailing", "linspace"), "clip_sample": (False,), "thresholding": (False,),
    "rescale_betas_zero_snr": (False,), "skip_prk_steps": (True,), "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",), "solver_order": (1, 2), "use_lu_lambdas": (False,), "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,), "use_flow_sigmas": (False,), "variance_type": (None,), "lambda_min_clipped": (None,),
    "final_sigmas_type": ("zero", "sigma_min"), "interpolation_type": ("linear",), "timestep_type": ("discrete",),
}
COMPVIS = {"class": "DDIMScheduler", "config": {"timestep_spacing": "leading", "steps_offset": 1,
                                                "set_alpha_to_one": False, "clip_sample": False}}


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler, fully configured: ``name`` (ptqd's, e.g. ``dpm++2m-karras``) and the diffusers class and
    config it reproduces."""

    name: str
    cls: str
    config: tuple[tuple[str, Any], ...]

    def get(self, key: str):
        return dict(self.config)[key]

    def to_json(self) -> dict:
        return {"name": self.name, "class": self.cls, "config": dict(self.config)}


def ddim_spec(spacing: str = "compvis") -> SamplerSpec:
    """DDIM on ptqd's calibration spacing: ``compvis`` (leading, offset 1) or ``leading`` (offset 0)."""
    config = dict(COMPVIS["config"], steps_offset=1 if spacing == "compvis" else 0)
    return resolve({"class": "DDIMScheduler", "config": config})


def clean_config(cfg: dict) -> dict:
    """The keys of a diffusers scheduler config that any supported class reads (JSON values only; diffusers
    writes ``lambda_min_clipped: -Infinity`` for "no clipping", kept as None so the manifest stays strict JSON)."""
    import math

    known = set().union(*(d.keys() for d in DEFAULTS.values()))
    out = {}
    for k, v in cfg.items():
        if k not in known or not (v is None or isinstance(v, (bool, int, float, str))):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            if k != "lambda_min_clipped" or v > 0:
                continue
            v = None
        out[k] = v
    return out


def name_of(cls: str, config: dict) -> str:
    """ptqd's name for a diffusers class and config (``dpm++2m-karras``, ...)."""
    if cls == "DPMSolverMultistepScheduler":
        base = "dpm++1" if config.get("solver_order") == 1 else "dpm++2m"
    else:
        base = {v: k for k, v in SAMPLERS.items() if not k.startswith("dpm")}[cls]
    return base + ("-karras" if config.get("use_karras_sigmas") else "")


def resolve(stored: dict | None, override: str | None = None) -> SamplerSpec:
    """The sampler to run: the bundle's (``stored``: ``{"class", "config"}``, None for CompVis spacing DDIM),
    or ``override`` (a name of :data:`SAMPLER_CHOICES`) configured from the stored config as
    ``from_config`` would. UserError naming what is not supported."""
    stored = stored or COMPVIS
    stored = {"class": stored["class"], "config": clean_config(stored["config"])}
    if override in (None, "", "auto", "bundle"):
        cls = stored["class"]
        if cls not in DEFAULTS:
            raise UserError(f"the bundle's scheduler {cls} is not one ptqd reproduces; choose one with --sampler "
                            f"({', '.join(SAMPLER_CHOICES)})")
        config = {**DEFAULTS[cls], **{k: v for k, v in stored["config"].items() if k in DEFAULTS[cls]}}
    else:
        if override not in SAMPLER_CHOICES:
            raise UserError(f"--sampler {override!r}: choose one of {', '.join(SAMPLER_CHOICES)}")
        base = override.removesuffix("-karras")
        cls = SAMPLERS[base]
        config = {**DEFAULTS[cls], **{k: v for k, v in stored["config"].items() if k in DEFAULTS[cls]}}
        if "use_karras_sigmas" in config:
            config["use_karras_sigmas"] = override.endswith("-karras")
        if cls == "DPMSolverMultistepScheduler":
            config["solver_order"] = 1 if base == "dpm++1" else 2
        if cls == "PNDMScheduler":
            config["skip_prk_steps"] = True  # PLMS, as Stable Diffusion runs PNDM
        if cls == "DDIMScheduler" and stored["class"] != "DDIMScheduler":
            config["clip_sample"] = False  # the pipeline's own sampler did not clip: neither does its DDIM
    bad = [f"{k}={config[k]!r}" for k, ok in SUPPORTED.items() if k in config and config[k] not in ok]
    if bad:
        raise UserError(f"{cls} with {', '.join(bad)} is not supported by ptqd's samplers (supported: "
                        + "; ".join(f"{k} in {list(SUPPORTED[k])}" for k in
                                    (b.split("=")[0] for b in bad)) + "); choose another with --sampler")
    return SamplerSpec(name_of(cls, config), cls, tuple(sorted(config.items())))


def diffusers_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """ᾱ in float32, as diffusers' schedulers hold it (their σ and step arithmetic is float32)."""
    betas = (1.0 - np.asarray(alphas_cumprod, np.float64) / np.concatenate([[1.0], alphas_cumprod[:-1]]))
    return np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32)


def spaced_timesteps(spacing: str, T: int, n: int, offset: int, dpm: bool = False) -> np.ndarray:
    """Descending timesteps by diffusers' spacing rules (Lin et al. 2023, table 2) as Euler's and DPM-Solver's
    ``set_timesteps`` make them (``dpm``: DPM-Solver spaces n + 1 points, rounds, and drops the last)."""
    if spacing == "linspace":
        if dpm:
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.float64)
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if spacing == "leading":
        k = n + 1 if dpm else n
        return ((np.arange(0, k) * (T // k)).round()[::-1][:n] + offset).astype(np.float64)
    if spacing == "trailing":
        return (np.arange(T, 0, -T / n).round() - 1).astype(np.float64)
    raise UserError(f"timestep_spacing {spacing!r} is not supported (leading, trailing, linspace)")


def sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """diffusers' ``_sigma_to_t``: the (fractional) timestep of σ by linear interpolation in log σ."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(min(np.cumsum(dists >= 0).argmax(), log_sigmas.shape[0] - 2))
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = float(np.clip((lo - log_sigma) / (lo - hi), 0, 1))
    return float((1 - w) * low + w * (low + 1))


def karras(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: n σ from σ_max down to σ_min, uniform in σ^(1/ρ)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


class Scheduler:
    """The contract every sampler keeps: ``set_timesteps(n)``; then for i, t in enumerate(``timesteps``) the
    UNet sees ``scale_model_input(x, i)`` at time t and ``step(eps, i, x, noise, residual_std)`` gives the
    next x. ``timesteps`` (float64, the UNet's time input) may hold more entries than n (PNDM's PLMS runs
    n + 1). A scheduler keeps history (multistep methods): one instance per trajectory batch."""

    stochastic = False  # whether step() needs fresh noise
    init_noise_sigma = 1.0

    def __init__(self, alphas_cumprod: np.ndarray, spec: SamplerSpec):
        self.ac = np.asarray(alphas_cumprod, np.float64)
        self.T = len(self.ac)
        self.spec = spec
        self.timesteps = np.zeros(0)

    def max_steps(self) -> int:
        return self.T - (1 if self.spec.get("timestep_spacing") == "leading" and self.spec.get("steps_offset") else 0)

    def set_timesteps(self, n: int) -> None:
        most = self.max_steps()
        if not 1 <= n <= most:
            raise UserError(f"--steps must be in [1, {most}] for {self.spec.name}, got {n}")
        self._set(n)

    def _set(self, n: int) -> None:
        raise NotImplementedError

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x

    def step(self, eps: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None,
             residual_std: float = 0.0) -> np.ndarray:
        raise NotImplementedError


class DDIM(Scheduler):
    """DDIM by :class:`DDIMSampler` (η, VSC), on the config's spacing."""

    def __init__(self, alphas_cumprod, spec, eta: float = 0.0, vsc_direction: str = "sigma"):
        super().__init__(alphas_cumprod, spec)
        self.ddim = DDIMSampler(self.ac, spec.get("timestep_spacing"), steps_offset=int(spec.get("steps_offset")),
                                set_alpha_to_one=bool(spec.get("set_alpha_to_one")))
        self.eta, self.vsc_direction = eta, vsc_direction
        self.stochastic = eta > 0

    def max_steps(self) -> int:
        return self.ddim.max_steps()

    def _set(self, n):
        self.ddim.set_timesteps(n)
        self.timesteps = self.ddim.timesteps.astype(np.float64)

    def step(self, eps, i, x, noise=None, residual_std=0.0):
        return self.ddim.step(eps, int(self.timesteps[i]), x, self.eta, noise, residual_std=residual_std,
                              vsc_direction=self.vsc_direction)[0]


class PNDM(Scheduler):
    """PNDM's pseudo linear multistep (PLMS) part, as Stable Diffusion runs it (``skip_prk_steps``): n + 1
    UNet calls; a 4th-order Adams-Bashforth combination of the last ε, started with lower orders and one
    repeated timestep, applied by the pseudo-numerical DDIM-like transfer of Liu et al. (2022) eq. 9."""

    def max_steps(self) -> int:
        return self._ddim().max_steps()

    def _ddim(self) -> DDIMSampler:
        """PNDM spaces its timesteps, and ends on ᾱ_0 or 1, by DDIM's rules."""
        return DDIMSampler(self.ac, self.spec.get("timestep_spacing"), steps_offset=int(self.spec.get("steps_offset")),
                           set_alpha_to_one=bool(self.spec.get("set_alpha_to_one")))

    def _set(self, n):
        ddim = self._ddim()
        ddim.set_timesteps(n)
        ts = ddim.timesteps[::-1]  # ascending, as PNDM's _timesteps
        self.timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].astype(np.float64)
        self.ratio = ddim.step_ratio
        self.final = ddim.final_alpha_cumprod
        self.ets: list[np.ndarray] = []
        self.counter = 0
        self.cur_sample = None

    def step(self, eps, i, x, noise=None, residual_std=0.0):
        t = int(self.timesteps[i])
        prev = t - self.ratio
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(eps)
        else:
            prev, t = t, t + self.ratio
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            e = eps
            self.cur_sample = x
        elif len(ets) == 1 and self.counter == 1:
            e = (eps + ets[-1]) / 2
            x, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        self.counter += 1
        a_t = float(self.ac[t])
        a_prev = float(self.ac[prev]) if prev >= 0 else self.final
        coeff = (a_prev / a_t) ** 0.5
        denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
        return (coeff * x - (a_prev - a_t) * e / denom).astype(np.float32)


class Sigmas(Scheduler):
    """Shared by the σ-space samplers: σ_t from ᾱ (float32, as diffusers), spacing, Karras, final σ."""

    dpm = False  # DPM-Solver's spacing and Karras rules

    def _set(self, n):
        cfg = dict(self.spec.config)
        ac = diffusers_alphas_cumprod(self.ac)
        sig = np.array(((1 - ac) / ac) ** 0.5)  # float32
        log_sigmas = np.log(sig)
        ts = spaced_timesteps(cfg["timestep_spacing"], self.T, n, int(cfg["steps_offset"]), self.dpm)
        if cfg.get("use_karras_sigmas"):
            if self.dpm:  # Karras between the table's ends
                sigmas = karras(float(sig[0]), float(sig[-1]), n)
            else:  # between the spaced σ's ends, or the config's sigma_min / sigma_max
                spaced = np.interp(ts, np.arange(len(sig)), sig)
                lo, hi = cfg.get("sigma_min"), cfg.get("sigma_max")
                sigmas = karras(float(spaced[-1]) if lo is None else lo, float(spaced[0]) if hi is None else hi, n)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            ts = ts.round() if self.dpm else ts.astype(np.float32).astype(np.float64)
        else:
            sigmas = np.interp(ts, np.arange(len(sig)), sig)
        last = float(((1 - ac[0]) / ac[0]) ** 0.5) if cfg.get("final_sigmas_type") == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32).astype(np.float64)
        self.timesteps = ts.astype(np.float64)
        self._init()

    def _init(self) -> None:
        pass


class Euler(Sigmas):
    """Euler's method on the probability-flow ODE in σ (Karras et al. 2022, algorithm 1 without churn):
    x ← x + ε·(σ_next − σ)."""

    @property
    def init_noise_sigma(self) -> float:
        m = float(self.sigmas.max())
        return m if self.spec.get("timestep_spacing") in ("linspace", "trailing") else (m * m + 1) ** 0.5

    def scale_model_input(self, x, i):
        return (x / np.float32((float(self.sigmas[i]) ** 2 + 1) ** 0.5)).astype(np.float32)

    def step(self, eps, i, x, noise=None, residual_std=0.0):
        s, s_next = np.float32(self.sigmas[i]), np.float32(self.sigmas[i + 1])
        x0 = x - s * eps
        d = (x - x0) / s
        return (x + d * (s_next - s)).astype(np.float32)


class EulerAncestral(Euler):
    """Euler ancestral: an Euler step to σ_down, then fresh noise of std σ_up, σ_down² + σ_up² = σ_next².

    VSC: ε's residual quantization noise r reaches x with ε's coefficient σ_down − σ, i.e. as extra variance
    (σ_down − σ)²·r²; the step then injects only σ_up′ = √max(σ_up² − (σ_down − σ)²·r², 0), so the total noise
    stays σ_up² (the same algebra as DDIM's σ_t′, with λ_t = σ_down − σ)."""

    stochastic = True

    def step(self, eps, i, x, noise=None, residual_std=0.0):
        if noise is None:
            raise ValueError("euler-a needs the step's noise")
        s, s_next = np.float32(self.sigmas[i]), np.float32(self.sigmas[i + 1])
        up = np.float32((s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = np.float32((s_next**2 - up**2) ** 0.5)
        if residual_std > 0:
            up = np.float32(max(float(up) ** 2 - float(down - s) ** 2 * residual_std**2, 0.0) ** 0.5)
        x0 = x - s * eps
        d = (x - x0) / s
        return (x + d * (down - s) + noise * up).astype(np.float32)


class DPMSolverPP(Sigmas):
    """DPM-Solver++ multistep (Lu et al. 2022, algorithms 1-2; data prediction, midpoint form), order 1 or 2,
    with the final step taken at first order where diffusers does (``lower_order_final``, final σ 0)."""

    dpm = True

    def _init(self):
        self.order = int(self.spec.get("solver_order"))
        self.outputs: list[np.ndarray] = []
        self.lower = 0

    @staticmethod
    def alpha_sigma(s: float) -> tuple[float, float]:
        a = np.float32(1.0) / np.float32((s**2 + 1) ** 0.5)
        return float(a), float(np.float32(s) * a)

    def step(self, eps, i, x, noise=None, residual_std=0.0):
        n = len(self.timesteps)
        cfg = dict(self.spec.config)
        final = i == n - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                or cfg["final_sigmas_type"] == "zero")
        a_s, s_s = self.alpha_sigma(float(self.sigmas[i]))
        x0 = ((x - np.float32(s_s) * eps) / np.float32(a_s)).astype(np.float32)
        self.outputs = (self.outputs + [x0])[-2:]
        a_t, s_t = self.alpha_sigma(float(self.sigmas[i + 1]))
        if self.order == 1 or self.lower < 1 or final:
            if s_t == 0:
                out = x0
            else:
                h = (np.log(a_t) - np.log(s_t)) - (np.log(a_s) - np.log(s_s))
                out = (s_t / s_s) * x - (a_t * (np.exp(-h) - 1.0)) * x0
        else:
            m0, m1 = self.outputs[-1], self.outputs[-2]
            a_p, s_p = self.alpha_sigma(float(self.sigmas[i - 1]))
            lam_t, lam_s0, lam_s1 = (np.log(a_t) - np.log(s_t), np.log(a_s) - np.log(s_s), np.log(a_p) - np.log(s_p))
            h, h0 = lam_t - lam_s0, lam_s0 - lam_s1
            d1 = (1.0 / (h0 / h)) * (m0 - m1)
            out = (s_t / s_s) * x - (a_t * (np.exp(-h) - 1.0)) * m0 - 0.5 * (a_t * (np.exp(-h) - 1.0)) * d1
        self.lower = min(self.lower + 1, self.order)
        return np.asarray(out, np.float32)


CLASSES = {"DDIMScheduler": DDIM, "PNDMScheduler": PNDM, "DPMSolverMultistepScheduler": DPMSolverPP,
           "EulerDiscreteScheduler": Euler, "EulerAncestralDiscreteScheduler": EulerAncestral}


def make_scheduler(alphas_cumprod: np.ndarray, spec: SamplerSpec, eta: float = 0.0,
                   vsc_direction: str = "sigma") -> Scheduler:
    """A fresh scheduler for one trajectory batch. ``eta`` is DDIM's (other samplers refuse η > 0)."""
    if spec.cls == "DDIMScheduler":
        return DDIM(alphas_cumprod, spec, eta, vsc_direction)
    if eta > 0:
        raise UserError(f"--eta {eta:g}: η is DDIM's; {spec.name} is "
                        + ("stochastic by itself" if spec.cls == "EulerAncestralDiscreteScheduler" else
                           "deterministic") + " (use --eta 0, or --sampler ddim)")
    return CLASSES[spec.cls](alphas_cumprod, spec)
