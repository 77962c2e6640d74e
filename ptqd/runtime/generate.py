"""Sampling images from a bundle: the runtime's entry point (numpy + the engines; no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ptqd.bundle import Bundle, layout
from ptqd.errors import UserError
from ptqd.progress import progress_bar
from ptqd.runtime.loader import CORRECTION_MODES, default_labels, open_decoder, sampler_config, step_engines
from ptqd.runtime.pipeline import decode, grid, sample_latents
from ptqd.validate import output_file, sampling_counts


def sample(bundle, classes=None, num: int = 16, seed: int = 0, steps: int = 20, eta: float = 0.0,
           guidance: float = 3.0, out: str | os.PathLike | None = None, precision: str = "fp32",
           batch: int = 64, progress: bool | None = None, correction: str = "auto",
           prompts: list[str] | None = None, negative_prompt: str = "", backend: str = "onnxruntime"):
    """Sample ``num`` images (labels cycle through ``classes``, or, for a text-to-image bundle, through
    ``prompts``, guided away from ``negative_prompt``). Returns (images uint8 NHWC, labels: class or
    prompt index). A text-to-image bundle without ``prompts`` samples its calibration prompts.

    ``precision``: ``fp32``, an engine (``w8a8``, ...), ``auto`` (the bundle's mixed-precision plan) or
    a plan FILE.json. ``correction``: ``auto`` (what the end-to-end gate kept), ``on`` (PTQD's raw fit and
    VSC), ``conditional``, ``off``.
    ``out``: ``FILE.png`` writes a grid, ``FILE.npz`` writes ``images`` and ``labels``. Sample i's noise
    depends only on (seed, i): the same seed pairs samples across engines.
    """
    sampling_counts(num=num, batch=batch, seed=seed)  # every option is checked before any work
    if correction not in CORRECTION_MODES:
        raise UserError(f"--correction must be auto, on, conditional or off, got {correction!r}")
    if out is not None and Path(out).suffix not in (".png", ".npz"):
        raise UserError(f"--out {out}: expected a .png (grid) or .npz (arrays) file")
    if out is not None:
        output_file(out)
    b = Bundle.open(bundle)
    facts = b.facts
    decoder, table = open_decoder(b), layout.class_embedding(b)
    cfg = sampler_config(facts, steps, eta, guidance)
    sampling_counts(num=num, sample_shape=facts.image_shape if decoder is not None else facts.latent_shape,
                    itemsize=1 if decoder is not None else 4)
    if prompts is not None or facts.conditioning.kind == "text":
        table, labels = prompt_table(b, prompts, negative_prompt, classes, num)
    else:
        labels = default_labels(facts, list(classes) if classes else None, num)
    if decoder is None and out is not None and Path(out).suffix == ".png":
        raise UserError(f"{b.root} has no first-stage decoder, so samples stay latents: write .npz instead")
    runner, _label = step_engines(b, precision, correction, backend=backend)
    chunks = []
    with progress_bar(num, f"sample {precision}", progress) as bar:
        for s0 in range(0, num, batch):
            idx = np.arange(s0, min(num, s0 + batch))
            lat = sample_latents(runner, facts, table, labels[idx], idx, seed, cfg)
            chunks.append(decode(decoder, lat, facts.scale_factor) if decoder is not None else lat)
            bar.update(len(idx))
    images = np.concatenate(chunks)
    if out is not None:
        write_samples(Path(out), images, labels, cols=grid_cols(facts, classes or prompts, num))
    return images, labels


def prompt_table(b, prompts, negative_prompt: str, classes, num: int):
    """(context table, labels) of a text-to-image bundle: the prompts encoded (row 0 the negative prompt)
    and labels cycling through them; without prompts, the bundle's calibration prompts."""
    if b.facts.conditioning.kind != "text":
        raise UserError(f"--prompt: {b.root} is not a text-to-image bundle (its conditioning is "
                        f"{b.facts.conditioning.kind}); use --classes for class-conditional models")
    if classes:
        raise UserError("--classes: a text-to-image bundle is conditioned on prompts: use --prompt")
    if prompts is not None:
        prompts = list(prompts)
        if not prompts:
            raise UserError("--prompt: give at least one prompt")
        from ptqd.runtime.text import PromptEncoder

        table = PromptEncoder(b).table(prompts, negative_prompt)
    else:
        table = layout.class_embedding(b)
        if negative_prompt:
            raise UserError("--negative-prompt needs --prompt (the bundle's calibration prompts use \"\")")
    return table, 1 + np.arange(num) % (len(table) - 1)


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
