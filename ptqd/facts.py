"""Facts about a model that travel with it into the bundle: noise schedule and conditioning.

Plain data (stdlib + numpy) so the runtime and the bundle can read them without torch.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ptqd.errors import BundleError

SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine", "explicit")
MAX_TRAIN_TIMESTEPS = 1_000_000
MAX_DIM = 1 << 16  # latent / image sides and channels, classes, context width
MAX_ELEMENTS = 1 << 28  # per sample, latent or image (1 GiB of float32)
SCALE_FACTOR = (1e-3, 1e3)  # beyond, decode(z / scale_factor) sees all-zero or saturated latents

# what the source UNet predicts; ptqd's exported graph always outputs epsilon (v is converted inside it)
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _count(name: str, v: Any, lo: int = 1, hi: int = MAX_DIM) -> None:
    if not _is_int(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Discrete-time DDPM schedule β_1..β_T (index 0 is t = 0 in code).

    ``scaled_linear``: β_t = (linspace(√β_start, √β_end, T))², what CompVis calls "linear"
    (``make_beta_schedule('linear')``) and diffusers calls "scaled_linear".
    ``linear``: β_t = linspace(β_start, β_end, T) (CompVis "sqrt_linear").
    ``cosine``: Nichol & Dhariwal, s = 0.008, β clipped at 0.999.
    ``explicit``: the betas are given.
    """

    kind: str
    num_train_timesteps: int
    beta_start: float | None = None
    beta_end: float | None = None
    betas_explicit: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown beta schedule {self.kind!r}; expected one of {SCHEDULE_KINDS}")
        _count("num_train_timesteps", self.num_train_timesteps, 2, MAX_TRAIN_TIMESTEPS)
        if self.kind in ("scaled_linear", "linear"):
            if self.beta_start is None or self.beta_end is None:
                raise ValueError(f"a {self.kind} schedule needs beta_start and beta_end")
            for name in ("beta_start", "beta_end"):
                v = getattr(self, name)
                if not _is_real(v) or not 0 < v < 1:  # NaN fails the comparison
                    raise ValueError(f"{name} must be a number in (0, 1), got {v!r}")
            if self.beta_start > self.beta_end:
                raise ValueError(f"beta_start {self.beta_start} > beta_end {self.beta_end}: the noise must grow with t")
        if self.kind == "explicit" and (self.betas_explicit is None or len(self.betas_explicit) != self.num_train_timesteps):
            raise ValueError("an explicit schedule needs num_train_timesteps betas")
        b = self.betas
        if not (np.isfinite(b).all() and (b > 0).all() and (b < 1).all()):
            raise ValueError("every beta must be a finite number in (0, 1)")
        if (np.diff(b) < 0).any():
            raise ValueError("the betas must not decrease with t (the noise grows with t)")
        if not self.alphas_cumprod[-1] > 0:
            raise ValueError(f"alphas_cumprod underflows to 0 by t = {self.num_train_timesteps}: the schedule "
                             "leaves no signal to denoise")

    @property
    def betas(self) -> np.ndarray:
        T = self.num_train_timesteps
        if self.kind == "scaled_linear":
            return np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float64) ** 2
        if self.kind == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        if self.kind == "cosine":
            s = 8e-3
            steps = np.arange(T + 1, dtype=np.float64) / T + s
            f = np.cos(steps / (1 + s) * np.pi / 2) ** 2
            return np.clip(1 - f[1:] / f[:-1], 0, 0.999)
        return np.asarray(self.betas_explicit, dtype=np.float64)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = Π_{s<=t} (1 - β_s), float64, shape [T]."""
        return np.cumprod(1.0 - self.betas)

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        if self.betas_explicit is not None:
            d["betas_explicit"] = list(self.betas_explicit)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "NoiseSchedule":
        d = dict(d)
        if "betas_explicit" in d:
            d["betas_explicit"] = tuple(float(b) for b in d["betas_explicit"])
        return cls(**d)


@dataclass(frozen=True)
class Conditioning:
    """How the UNet is conditioned.

    ``class``: a class label is embedded (table ``[num_classes, context_dim]``) and fed as a
    one-token cross-attention context; ``null_class`` is the unconditional class used by
    classifier-free guidance. ``text``: a prompt is tokenized (``context_tokens`` ids) and encoded
    by a text encoder into the context ``[context_tokens, context_dim]``; a bundle keeps its
    calibration prompts encoded as a table ``[num_classes, context_tokens, context_dim]`` whose row
    ``null_class`` (0) is the negative prompt "", so labels index prompts as they index classes
    (``num_classes`` is None on a loaded model, before the prompts are chosen). ``none``: unconditional.
    """

    kind: str = "none"  # "none" | "class" | "text"
    num_classes: int | None = None
    null_class: int | None = None
    context_dim: int | None = None
    context_tokens: int = 1

    def __post_init__(self):
        if self.kind not in ("none", "class", "text"):
            raise ValueError(f"unknown conditioning kind {self.kind!r}")
        if self.kind == "text":
            if self.context_dim is None:
                raise ValueError("text conditioning needs context_dim")
            _count("context_dim", self.context_dim)
            _count("context_tokens", self.context_tokens)
            if self.num_classes is not None:
                _count("num_classes", self.num_classes, 2, 1 << 24)
                if self.null_class != 0:
                    raise ValueError(f"text conditioning: the negative prompt is row 0, got null_class {self.null_class!r}")
        if self.kind == "class":
            if self.num_classes is None or self.context_dim is None:
                raise ValueError("class conditioning needs num_classes and context_dim")
            _count("num_classes", self.num_classes, 2, 1 << 24)
            _count("context_dim", self.context_dim)
            _count("context_tokens", self.context_tokens)
            if not _is_int(self.null_class) or not 0 <= self.null_class < self.num_classes:
                raise ValueError(f"null_class must be a class index in [0, {self.num_classes - 1}], "
                                 f"got {self.null_class!r}")

    @property
    def guided(self) -> bool:
        """Whether the model has an unconditional context for classifier-free guidance."""
        return self.kind != "none"

    def with_prompts(self, count: int) -> "Conditioning":
        """Text conditioning bound to a table of ``count`` prompts plus the negative prompt (row 0)."""
        return Conditioning(kind="text", num_classes=count + 1, null_class=0, context_dim=self.context_dim,
                            context_tokens=self.context_tokens)

    def same_model(self, other: "Conditioning") -> bool:
        """Whether two conditionings describe the same network inputs (text: whatever prompts they bind)."""
        if self.kind == other.kind == "text":
            return (self.context_dim, self.context_tokens) == (other.context_dim, other.context_tokens)
        return self == other


@dataclass(frozen=True)
class ModelFacts:
    """What later stages need to know about the model, independent of its source format."""

    family: str  # "compvis-ldm" | "diffusers" | "demo"
    latent_shape: tuple[int, int, int]  # (C, H, W)
    schedule: NoiseSchedule
    conditioning: Conditioning = field(default_factory=Conditioning)
    prediction_type: str = "epsilon"
    scale_factor: float = 1.0  # latents are z * scale_factor; decode(z_sample / scale_factor)
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the first-stage output
    source: str = ""
    # the source pipeline's scheduler, {"class": "DPMSolverMultistepScheduler", "config": {...}} (the keys
    # ptqd.runtime.schedulers reads); None: DDIM on CompVis spacing (CompVis checkpoints, the demo)
    sampler: dict | None = None

    def __post_init__(self):
        if not isinstance(self.family, str):
            raise TypeError(f"family must be a string, got {self.family!r}")
        for name in ("latent_shape", "image_shape"):
            shape = getattr(self, name)
            if shape is None and name == "image_shape":
                continue
            if not isinstance(shape, tuple):
                raise TypeError(f"{name} must be a tuple (C, H, W), got {shape!r}")
            if len(shape) != 3:
                raise ValueError(f"{name} must be (C, H, W), got {shape!r}")
            for v in shape:
                _count(f"{name} entries", v)
            if math.prod(shape) > MAX_ELEMENTS:
                raise ValueError(f"{name} {shape} has more than {MAX_ELEMENTS} elements per sample")
        if not isinstance(self.schedule, NoiseSchedule) or not isinstance(self.conditioning, Conditioning):
            raise TypeError("schedule and conditioning must be a NoiseSchedule and a Conditioning")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (only "
                             f"{' or '.join(map(repr, PREDICTION_TYPES))})")
        if not _is_real(self.scale_factor) or not (SCALE_FACTOR[0] <= self.scale_factor <= SCALE_FACTOR[1]):
            raise ValueError(f"scale_factor must be a number in [{SCALE_FACTOR[0]:g}, {SCALE_FACTOR[1]:g}] (latents "
                             f"are z * scale_factor: 0.18215 for Stable Diffusion's VAE, 1 for VQ models), got "
                             f"{self.scale_factor!r}")
        if not isinstance(self.source, str):
            raise TypeError(f"source must be a string, got {self.source!r}")
        if self.sampler is not None and not (isinstance(self.sampler, dict) and isinstance(self.sampler.get("class"), str)
                                             and isinstance(self.sampler.get("config"), dict)):
            raise ValueError(f"sampler must be {{\"class\": NAME, \"config\": {{...}}}}, got {repr(self.sampler)[:100]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "latent_shape": list(self.latent_shape),
            "schedule": self.schedule.to_json(),
            "conditioning": asdict(self.conditioning),
            "prediction_type": self.prediction_type,
            "scale_factor": self.scale_factor,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "source": self.source,
            "sampler": self.sampler,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelFacts":
        try:
            return cls(
                family=d["family"],
                latent_shape=tuple(d["latent_shape"]),
                schedule=NoiseSchedule.from_json(d["schedule"]),
                conditioning=Conditioning(**d.get("conditioning", {})),
                prediction_type=d.get("prediction_type", "epsilon"),
                scale_factor=float(d.get("scale_factor", 1.0)),
                image_shape=tuple(d["image_shape"]) if d.get("image_shape") else None,
                source=d.get("source", ""),
                sampler=d.get("sampler"),
            )
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            raise BundleError(f"manifest 'model' section is malformed ({str(e)[:200]}); re-export the bundle") from None


def seeded_unet_inputs(facts, batch: int, t: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded UNet inputs (x ~ N(0, I), t, random context rows) for validation and benchmarks (numpy only)."""
    rng = np.random.RandomState(seed)
    c, h, w = facts.latent_shape
    feeds = {"x": rng.standard_normal((batch, c, h, w)).astype(np.float32),
             "t": np.full((batch,), t, dtype=np.float32)}
    if facts.conditioning.kind != "none":
        cond = facts.conditioning
        feeds["context"] = rng.standard_normal((batch, cond.context_tokens, cond.context_dim)).astype(np.float32)
    return feeds
