"""Sampling images from a bundle: the runtime's entry point (numpy + the engines; no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ptqd.bundle import Bundle, layout
from ptqd.errors import UserError
from ptqd.runtime.loader import CORRECTION_MODES, default_labels, load_plan, sampler_config
from ptqd.runtime.pipeline import grid
from ptqd.validate import output_file, sampling_counts


def sample(bundle, classes=None, num: int = 16, seed: int = 0, steps: int = 20, eta: float = 0.0,
           guidance: float = 3.0, out: str | os.PathLike | None = None, precision: str = "fp32",
           batch: int = 64, progress: bool | None = None, correction: str = "auto",
           prompts: list[str] | None = None, negative_prompt: str = "", backend: str = "auto",
           sampler: str = "auto", latents: np.ndarray | None = None):
    """Sample ``num`` images (labels cycle through ``classes``, or, for a text-to-image bundle, through
    ``prompts``, guided away from ``negative_prompt``). Returns (images uint8 NHWC, labels: class or
    prompt index). A text-to-image bundle without ``prompts`` samples its calibration prompts.

    ``precision``: ``fp32``, an engine (``w8a8``, ...), ``auto`` (the bundle's mixed-precision plan) or
    a plan FILE.json. ``correction``: ``auto`` (what the end-to-end gate kept), ``on`` (PTQD's raw fit and
    VSC), ``conditional``, ``off``. ``sampler``: ``auto`` (the bundle's own: its pipeline's scheduler) or a
    name of ``ptqd.runtime.schedulers.SAMPLER_CHOICES``. ``latents``: the initial noise [num, C, H, W], as
    diffusers' ``latents=`` takes it.
    ``out``: ``FILE.png`` writes a grid, ``FILE.npz`` writes ``images`` and ``labels``. Sample i's noise
    depends only on (seed, i): the same seed pairs samples across engines. A shell over
    :class:`ptqd.runtime.pipe.Pipeline`, which loads a bundle once for many calls.
    """
    from ptqd.runtime.pipe import Pipeline, check_latents

    sampling_counts(num=num, batch=batch, seed=seed)  # every option is checked before any work
    if correction not in CORRECTION_MODES:
        raise UserError(f"--correction must be auto, on, conditional or off, got {correction!r}")
    if out is not None and Path(out).suffix not in (".png", ".npz"):
        raise UserError(f"--out {out}: expected a .png (grid) or .npz (arrays) file")
    if out is not None:
        output_file(out)
    b = Bundle.open(bundle)
    facts = b.facts
    sampler_config(facts, steps, eta, guidance, sampler)
    load_plan(b, precision)  # "auto" needs a plan; a plan FILE must parse
    if latents is not None:
        latents = check_latents(latents, num, facts.latent_shape)
    has_decoder = b.has(layout.FIRST_STAGE_ONNX)
    sampling_counts(num=num, sample_shape=facts.image_shape if has_decoder else facts.latent_shape,
                    itemsize=1 if has_decoder else 4)
    if not has_decoder and out is not None and Path(out).suffix == ".png":
        raise UserError(f"{b.root} has no first-stage decoder, so samples stay latents: write .npz instead")
    text = prompts is not None or facts.conditioning.kind == "text"
    if text:
        check_prompt_options(b, prompts, negative_prompt, classes)
    else:
        labels = default_labels(facts, list(classes) if classes else None, num)
    pipe = Pipeline.from_bundle(b, precision, backend=backend, correction=correction)
    try:
        if text:
            table = pipe.prompt_table(prompts, negative_prompt) if prompts is not None else pipe.table
            labels = 1 + np.arange(num) % (len(table) - 1)
        else:
            table = pipe.table
        images = pipe.generate(table, labels, seed, steps, eta, guidance, sampler, latents, batch, progress)
    finally:
        pipe.close()
    if out is not None:
        write_samples(Path(out), images, labels, cols=grid_cols(facts, classes or prompts, num))
    return images, labels


def check_prompt_options(b, prompts, negative_prompt: str, classes) -> None:
    """The prompt options of a text-to-image sample, checked before anything loads."""
    if b.facts.conditioning.kind != "text":
        raise UserError(f"--prompt: {b.root} is not a text-to-image bundle (its conditioning is "
                        f"{b.facts.conditioning.kind}); use --classes for class-conditional models")
    if classes:
        raise UserError("--classes: a text-to-image bundle is conditioned on prompts: use --prompt")
    if prompts is not None and not list(prompts):
        raise UserError("--prompt: give at least one prompt")
    if prompts is None and negative_prompt:
        raise UserError("--negative-prompt needs --prompt (the bundle's calibration prompts use \"\")")


def grid_cols(facts, classes, num: int) -> int:
    if facts.conditioning.kind == "text" and classes:
        return min(num, len(classes))
    if facts.conditioning.kind == "class":
        return min(num, len(classes) if classes else facts.conditioning.num_classes - 1)
    return min(num, 8)


def write_samples(out: Path, images, labels, cols: int) -> None:
    """``out``: a .npz of images and labels, or a .png grid; written atomically."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        if out.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez_compressed(f, images=images, labels=labels)
        else:
            from PIL import Image

            g = grid(images, cols, scale=max(1, 96 // images.shape[1]))
            Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(tmp, format="PNG")
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e})") from None
