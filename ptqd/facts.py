"""Facts about a model that travel with it into the bundle: noise schedule and conditioning.

Plain data (stdlib + numpy) so the runtime and the bundle can read them without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ptqd.errors import BundleError

SCHEDULE_KINDS = ("scaled_linear", "linear", "cosine", "explicit")


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
        if self.kind in ("scaled_linear", "linear") and (self.beta_start is None or self.beta_end is None):
            raise ValueError(f"a {self.kind} schedule needs beta_start and beta_end")
        if self.kind == "explicit" and (self.betas_explicit is None or len(self.betas_explicit) != self.num_train_timesteps):
            raise ValueError("an explicit schedule needs num_train_timesteps betas")

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
    classifier-free guidance. ``none``: unconditional.
    """

    kind: str = "none"  # "none" | "class"
    num_classes: int | None = None
    null_class: int | None = None
    context_dim: int | None = None
    context_tokens: int = 1

    def __post_init__(self):
        if self.kind not in ("none", "class"):
            raise ValueError(f"unknown conditioning kind {self.kind!r}")
        if self.kind == "class" and (self.num_classes is None or self.context_dim is None):
            raise ValueError("class conditioning needs num_classes and context_dim")


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
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest 'model' section is malformed ({e}); re-export the bundle") from None


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
