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
           sampler: str = "auto", latents: np.ndarray | None = None, cluster=None, shard_size: int | None = None,
           original_size=None, crops_coords_top_left=None, target_size=None):
    """Sample ``num`` images (labels cycle through ``classes``, or, for a text-to-image bundle, through
    ``prompts``, guided away from ``negative_prompt``). Returns (images uint8 NHWC, labels: class or
    prompt index). A text-to-image bundle without ``prompts`` samples its calibration prompts.

    ``precision``: ``fp32``, an engine (``w8a8``, ...), ``auto`` (the bundle's mixed-precision plan) or
    a plan FILE.json. ``correction``: ``auto`` (what the end-to-end gate kept), ``on`` (PTQD's raw fit and
    VSC), ``conditional``, ``off``. ``sampler``: ``auto`` (the bundle's own: its pipeline's scheduler) or a
    name of ``ptqd.runtime.schedulers.SAMPLER_CHOICES``. ``latents``: the initial noise [num, C, H, W], as
    diffusers' ``latents=`` takes it. SDXL: ``original_size``, ``crops_coords_top_left``, ``target_size`` as
    :class:`ptqd.runtime.pipe.Pipeline` takes them.
    ``out``: ``FILE.png`` writes a grid, ``FILE.npz`` writes ``images`` and ``labels``. Sample i's noise
    depends only on (seed, i): the same seed pairs samples across engines. A shell over
    :class:`ptqd.runtime.pipe.Pipeline`, which loads a bundle once for many calls.
    ``cluster``: a :class:`ptqd.cluster.Cluster` spreads shards of ``shard_size`` samples (default ``batch``;
    whole batches) over Ray workers, each with its own Pipeline; the images are bit-identical to this process's.
    """
    from ptqd.runtime.pipe import Pipeline, check_latents, sdxl_time_ids, with_time_ids

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
    time_ids = sdxl_time_ids(b, original_size, crops_coords_top_left, target_size)
    if text:
        check_prompt_options(b, prompts, negative_prompt, classes)
    else:
        labels = default_labels(facts, list(classes) if classes else None, num)
    if cluster is not None:
        images, labels = sample_sharded(b, cluster, shard_size, precision, backend, correction, prompts,
                                        negative_prompt, labels if not text else None, num, seed, steps, eta, guidance,
                                        sampler, latents, batch, progress, time_ids)
    else:
        pipe = Pipeline.from_bundle(b, precision, backend=backend, correction=correction)
        try:
            if text:
                table = pipe.prompt_table(prompts, negative_prompt) if prompts is not None else pipe.table
                table = with_time_ids(b, table, time_ids)
                labels = 1 + np.arange(num) % (len(table) - 1)
            else:
                table = pipe.table
            images = pipe.generate(table, labels, seed, steps, eta, guidance, sampler, latents, batch, progress)
        finally:
            pipe.close()
    if out is not None:
        write_samples(Path(out), images, labels, cols=grid_cols(facts, classes or prompts, num))
    return images, labels


class SampleWorker:
    """A Ray worker of a sharded sample: the bundle's Pipeline, opened once; ``run((start, stop, latents))`` samples
    indices start..stop-1 exactly as the single-process run does (same batches, noise from (seed, i))."""

    def __init__(self, root: str, digest: str, precision: str, backend: str, correction: str, threads: int,
                 table: np.ndarray, labels: np.ndarray, settings: dict):
        from ptqd.runtime.pipe import Pipeline

        b = Bundle.open(root)
        b.check_digest(digest)
        self.pipe = Pipeline.from_bundle(b, precision, backend=backend, correction=correction, threads=threads)
        self.table, self.labels, self.settings = table, labels, settings

    def run(self, shard):
        start, stop, latents = shard
        s = self.settings
        images = self.pipe.generate(self.table, self.labels[start:stop], s["seed"], s["steps"], s["eta"],
                                    s["guidance"], s["sampler"], latents, s["batch"], False,
                                    indices=np.arange(start, stop))
        return images, stop - start


def sample_sharded(b, cluster, shard_size, precision, backend, correction, prompts, negative_prompt, labels, num,
                   seed, steps, eta, guidance, sampler, latents, batch, progress, time_ids=None):
    """``sample`` on Ray workers: shards of whole batches, the images put back in index order."""
    import sys

    from ptqd.cluster import index_shards, run_shards
    from ptqd.runtime.loader import resolve_backend

    shards = index_shards(num, shard_size or batch, batch)
    backend = resolve_backend(b, backend, log=lambda m: print(m, file=sys.stderr),
                              needs=load_plan(b, precision).precisions)
    if labels is None:  # text: the prompts are encoded once, here, and shipped to every worker
        from ptqd.runtime.text import PromptEncoder

        table = PromptEncoder(b).table(prompts, negative_prompt) if prompts is not None else layout.class_embedding(b)
        from ptqd.runtime.pipe import with_time_ids

        table = with_time_ids(b, table, time_ids)
        labels = 1 + np.arange(num) % (len(table) - 1)
    else:
        table = layout.class_embedding(b)
    if precision.endswith(".json"):
        precision = str(Path(precision).resolve())
    settings = dict(seed=seed, steps=steps, eta=eta, guidance=guidance, sampler=sampler, batch=batch)
    init = (str(b.root.resolve()), b.digest(), precision, backend, correction, cluster.threads, table, labels,
            settings)
    parts = run_shards(cluster, SampleWorker, init,
                       [(s, e, None if latents is None else latents[s:e]) for s, e in shards], num,
                       f"sample {precision}", progress)
    return np.concatenate(parts), labels


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
