"""Sampling: the DDIM loop over an engine runner, classifier-free guidance, first-stage decode.

numpy only. Conditioning is a context row per sample: the class embedding of its label,
and, for guidance, the null class's row in a doubled batch (as the CompVis sampler does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ptqd.errors import NonFiniteError, UserError
from ptqd.runtime.sampler import NoiseSource, SamplerConfig

# observe(step_index, t, x_t [B,C,H,W], context_or_None, eps_guided) — used by eval to compare engines
Observer = Callable[[int, int, np.ndarray, "GuidedContext", np.ndarray], None]


@dataclass
class GuidedContext:
    cond: np.ndarray | None  # [B, L, D]
    null: np.ndarray | None  # [B, L, D], None when unguided or unconditional
    guidance: float


def context_rows(table: np.ndarray, idx) -> np.ndarray:
    """Rows ``idx`` of a conditioning table as UNet contexts [B, L, D]: class embeddings ([n, D]) are one
    token each; encoded prompts ([n, tokens, D]) are already token sequences."""
    r = table[idx]
    return (r[:, None, :] if r.ndim == 2 else r).astype(np.float32)


def contexts(facts, class_embedding: np.ndarray | None, labels: np.ndarray, guidance: float) -> GuidedContext:
    """The context rows of ``labels`` in ``class_embedding``: class embeddings [classes, D] (one token each), or
    encoded prompts [1 + prompts, tokens, D] (text models; row ``null_class`` = 0 is the negative prompt)."""
    cond = facts.conditioning
    if cond.kind == "none":
        if guidance != 1.0:
            raise UserError("the model is unconditional: classifier-free guidance needs a conditioned model "
                            "(use --guidance 1)")
        return GuidedContext(None, None, 1.0)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(class_embedding)
    if labels.min() < 0 or labels.max() >= n:
        what = "prompt indices" if cond.kind == "text" else "class labels"
        raise UserError(f"{what} must be in [0, {n - 1}], got {sorted(set(labels.tolist()))}")
    null = context_rows(class_embedding, np.full(len(labels), cond.null_class)) if guidance != 1.0 else None
    return GuidedContext(context_rows(class_embedding, labels), null, guidance)


def guided_eps(runner, x: np.ndarray, t: int, ctx: GuidedContext) -> np.ndarray:
    """ε = ε_u + s·(ε_c − ε_u), one engine call on the doubled batch [cond; uncond]."""
    tt = np.full((x.shape[0],), float(t), dtype=np.float32)
    if ctx.null is None:
        return runner(x, tt, ctx.cond)
    out = runner(np.concatenate([x, x]), np.concatenate([tt, tt]), np.concatenate([ctx.cond, ctx.null]))
    e_c, e_u = np.split(out, 2)
    return e_u + ctx.guidance * (e_c - e_u)


def predict(engine, x: np.ndarray, t: int, ctx: GuidedContext):
    """(ε for the sampler, its residual-noise std for VSC) at timestep t. ``engine`` is a runner
    (ε as the engine computes it) or a :class:`~ptqd.runtime.correction.StepEngines` (the plan's
    engine for t, with the PTQD correction applied after guidance, as it was fitted)."""
    if not hasattr(engine, "at"):
        return guided_eps(engine, x, t, ctx), 0.0
    runner, corr = engine.at(t)
    return engine.correct(guided_eps(runner, x, t, ctx), corr), engine.residual_std(corr)


def scheduler_for(facts, cfg: SamplerConfig):
    """A fresh scheduler for one trajectory batch: ``cfg.spec``'s sampler, or DDIM on ``cfg.spacing``."""
    from ptqd.runtime.schedulers import ddim_spec, make_scheduler

    sched = make_scheduler(facts.schedule.alphas_cumprod, cfg.spec or ddim_spec(cfg.spacing), cfg.eta, cfg.vsc_direction)
    sched.set_timesteps(cfg.steps)
    return sched


def sample_latents(engine, facts, class_embedding, labels: np.ndarray, indices: np.ndarray, seed: int,
                   cfg: SamplerConfig, observe: Observer | None = None, start: tuple[int, np.ndarray] | None = None,
                   latents: np.ndarray | None = None) -> np.ndarray:
    """Run the sampler for one batch; sample i's noise comes from (seed, indices[i]). Returns x_0 latents.

    ``engine``: a runner, or a ``StepEngines`` (engine per step by plan, PTQD correction, VSC).
    ``latents``: the initial noise [B, C, H, W] instead of (seed, i)'s, taken as diffusers' ``latents=`` takes
    it (scaled by the sampler's ``init_noise_sigma``); a stochastic sampler's later noise still comes from
    (seed, i). ``observe(i, t, x, ctx, eps)`` sees the UNet's input x at each call.
    ``start=(i, x)``: resume at step i from x (as ``observe`` saw it there; DDIM only); the noise of the
    skipped steps is drawn and dropped, so the result equals the uninterrupted run's."""
    sched = scheduler_for(facts, cfg)
    ctx = contexts(facts, class_embedding, labels, cfg.guidance)
    noise = NoiseSource(seed, indices, tuple(facts.latent_shape))
    x = noise.draw()  # x_T (drawn even when latents are given, so the later noise does not shift)
    if latents is not None:
        x = np.array(latents, np.float32, copy=True)
        if x.shape != (len(indices), *facts.latent_shape):
            raise UserError(f"latents: expected shape {(len(indices), *facts.latent_shape)}, got {x.shape}")
    if sched.init_noise_sigma != 1.0:
        x = (x * np.float32(sched.init_noise_sigma)).astype(np.float32)
    first = 0
    if start is not None:
        if cfg.spec is not None and cfg.spec.cls != "DDIMScheduler":
            raise ValueError("resuming mid-trajectory needs DDIM (multistep samplers keep history)")
        first, x = start[0], np.array(start[1], np.float32, copy=True)
        if sched.stochastic:
            for _ in range(first):
                noise.draw()
    for i, t in enumerate(sched.timesteps):
        if i < first:
            continue
        t = int(t) if float(t).is_integer() else float(t)
        xin = sched.scale_model_input(x, i)
        eps, residual = predict(engine, xin, t, ctx)
        if observe is not None:
            observe(i, t, xin, ctx, eps)
        x = sched.step(eps, i, x, noise.draw() if sched.stochastic else None, residual_std=residual)
    if not np.isfinite(x).all():  # the engines check their inputs; this is the last step's output
        raise NonFiniteError(f"sampling diverged: {int(x.size - np.count_nonzero(np.isfinite(x)))} of {x.size} "
                             "latent values are NaN or infinite after the last step")
    return x


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC."""
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def decode(decoder, latents: np.ndarray, scale_factor: float) -> np.ndarray:
    return to_uint8(decoder(latents / scale_factor))


def grid(images: np.ndarray, cols: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """uint8 NHWC -> one uint8 HWC image with ``cols`` columns (grey background)."""
    n, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return out
