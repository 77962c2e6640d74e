"""``ptqd.Pipeline``: a bundle loaded once and called like a diffusers pipeline (numpy + the engines; no torch).

    pipe = ptqd.Pipeline.from_bundle("sd.bundle")              # the step-aware plan, PTQD's correction
    images = pipe("a red cat", num_inference_steps=20, seed=0).images

Loading opens the engines (every precision the plan switches between, each once), the decoder, the
tokenizer and text encoder of a text-to-image bundle, and the fitted correction. A call samples with the
bundle's own sampler (its pipeline's scheduler) unless ``sampler=`` names another. Sample i of a call has
noise from (seed, i) only, so a call's images do not depend on how they are batched, and the CLI's
``ptqd sample`` (a shell over this class) gives the same images for the same seed.

Calls may come from several threads: each call has its own sampler state, and the engine calls of
concurrent calls take turns (one engine already uses every core it was given).
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqd.bundle import Bundle, layout
from ptqd.errors import UserError
from ptqd.progress import progress_bar
from ptqd.runtime.loader import (CORRECTION_MODES, default_labels, load_plan, open_decoder, resolve_backend,
                                 sampler_config, step_engines)
from ptqd.runtime.pipeline import decode, sample_latents
from ptqd.validate import integer, sampling_counts

TEXT_GUIDANCE, CLASS_GUIDANCE = 7.5, 3.0  # diffusers' default for prompts; CompVis LDM's for classes


@dataclass
class PipelineOutput:
    """``images``: PIL images (``output_type="pil"``), or uint8 N×H×W×C (``"np"``); latents N×C×H×W float32 for
    a bundle without a decoder. ``labels``: each image's class, or its prompt's row (1.. in call order).
    ``seed``: the seed the noise came from (drawn at random when the call gave none)."""

    images: list | np.ndarray
    labels: np.ndarray
    seed: int


class Pipeline:
    def __init__(self, bundle: Bundle, engine, label: str, decoder, table, encoder, backend: str):
        self.bundle, self.facts = bundle, bundle.facts
        self.engine, self.label, self.decoder, self.table, self.encoder = engine, label, decoder, table, encoder
        self.backend = backend
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, path, precision: str = "auto", backend: str | None = None, correction: str = "auto",
                    threads: int | None = None) -> "Pipeline":
        """Load a bundle once. ``precision``: ``auto`` (the bundle's step-aware plan, or FP32 where it has
        none), ``fp32``, an engine (``w8a8``, ...) or a plan FILE.json. ``backend``: ``onnxruntime`` (default),
        ``openvino`` or ``tensorrt``. ``correction``: auto | on | conditional | off (see ``ptqd sample --help``)."""
        if correction not in CORRECTION_MODES:
            raise UserError(f"correction must be auto, on, conditional or off, got {correction!r}")
        import sys

        b = path if isinstance(path, Bundle) else Bundle.open(path)
        spec = "fp32" if precision == "auto" and not b.has(layout.PLAN_JSON) else precision
        backend = resolve_backend(b, backend, log=lambda m: print(m, file=sys.stderr),
                                  needs=load_plan(b, spec).precisions)
        engine, label = step_engines(b, spec, correction, threads=threads, backend=backend)
        encoder = None
        if b.facts.conditioning.kind == "text":
            from ptqd.runtime.text import PromptEncoder

            encoder = PromptEncoder(b, threads)
        return cls(b, engine, label, open_decoder(b, threads), layout.class_embedding(b), encoder, backend)

    def __repr__(self) -> str:
        return f"Pipeline({self.bundle.root}, {self.label}, {self.backend})"

    # -- conditioning --------------------------------------------------------------------------------------

    def prompt_table(self, prompts: list[str], negative_prompt: str = "") -> np.ndarray:
        """Encoded prompts, row 0 the negative prompt: what labels 1..len(prompts) index."""
        if self.encoder is None:
            raise UserError(f"{self.bundle.root} is not a text-to-image bundle (its conditioning is "
                            f"{self.facts.conditioning.kind}); give class_labels= (or --classes) instead of prompts")
        return self.encoder.table(list(prompts), negative_prompt)

    def _conditioning(self, prompt, negative_prompt, class_labels, per_prompt: int, time_ids=None):
        kind = self.facts.conditioning.kind
        if kind == "text":
            if class_labels is not None:
                raise UserError("class_labels: a text-to-image bundle is conditioned on prompts: give prompt=")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            if not prompts:
                raise UserError("prompt: give a prompt (or a list of prompts)")
            neg = negative_prompt if negative_prompt is not None else ""
            if not isinstance(neg, str):
                negs = list(neg)
                if len(set(negs)) > 1:
                    raise UserError("negative_prompt: give one negative prompt for the whole call (a list must "
                                    "repeat the same text)")
                neg = negs[0] if negs else ""
            table = with_time_ids(self.bundle, self.prompt_table(prompts, neg), time_ids)
            return table, np.repeat(1 + np.arange(len(prompts)), per_prompt)
        if prompt is not None or negative_prompt is not None:
            raise UserError(f"prompt: {self.bundle.root} is conditioned on {kind if kind != 'none' else 'nothing'}, "
                            "not on text" + ("; give class_labels=" if kind == "class" else ""))
        if kind == "none":
            if class_labels is not None:
                raise UserError("class_labels: the model is unconditional")
            return self.table, np.zeros(per_prompt, np.int64)
        labels = [class_labels] if isinstance(class_labels, (int, np.integer)) else list(class_labels or [])
        if not labels:
            labels = list(default_labels(self.facts, None, self.facts.conditioning.num_classes - 1))
        return self.table, np.repeat(default_labels(self.facts, [int(c) for c in labels], len(labels)), per_prompt)

    # -- sampling ------------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 20, guidance_scale: float | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, latents: np.ndarray | None = None, class_labels=None, eta: float = 0.0,
                 sampler: str = "auto", output_type: str = "pil", batch: int = 64,
                 progress: bool | None = False, original_size=None, crops_coords_top_left=None,
                 target_size=None) -> PipelineOutput:
        """Sample, as a diffusers pipeline call does. ``latents``: the initial noise [N, C, H, W] (N = prompts ×
        num_images_per_prompt), taken as diffusers' ``latents=`` takes it. ``guidance_scale`` defaults to 7.5 for
        prompts (diffusers') and 3.0 for classes. ``sampler``: ``auto`` (the bundle's own) or a name
        (``ptqd sample --help``). ``output_type``: ``pil`` or ``np``. SDXL: ``original_size``,
        ``crops_coords_top_left`` and ``target_size`` ((height, width), (top, left)) as diffusers' SDXL pipeline
        takes them (default: the image size, no crop), for the prompts and the negative prompt alike."""
        if output_type not in ("pil", "np"):
            raise UserError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        time_ids = sdxl_time_ids(self.bundle, original_size, crops_coords_top_left, target_size)
        integer("num_images_per_prompt", num_images_per_prompt, 1, 1 << 16)
        if guidance_scale is None:
            guidance_scale = TEXT_GUIDANCE if self.facts.conditioning.kind == "text" else CLASS_GUIDANCE
        if seed is None:
            seed = secrets.randbelow(2**31)
        table, labels = self._conditioning(prompt, negative_prompt, class_labels, num_images_per_prompt, time_ids)
        images = self.generate(table, labels, seed, num_inference_steps, eta, guidance_scale, sampler, latents,
                               batch, progress)
        if output_type == "pil" and self.decoder is not None:
            from PIL import Image

            images = [Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images]
        return PipelineOutput(images, labels, int(seed))

    def generate(self, table, labels: np.ndarray, seed: int, steps: int = 20, eta: float = 0.0,
                 guidance: float = 3.0, sampler: str = "auto", latents: np.ndarray | None = None, batch: int = 64,
                 progress: bool | None = None, indices: np.ndarray | None = None) -> np.ndarray:
        """Images uint8 N×H×W×C (latents where the bundle has no decoder) for ``labels`` rows of ``table``;
        sample k's noise from (seed, indices[k]) (default indices 0..N-1). ``seed`` may be an array of one seed
        per sample (``ptqd serve`` batches requests with their own seeds)."""
        labels = np.asarray(labels, np.int64)
        n = len(labels)
        idx_all = np.arange(n) if indices is None else np.asarray(indices, np.int64)
        seeds = np.broadcast_to(np.asarray(seed, np.int64), (n,)) if np.ndim(seed) else None
        sampling_counts(num=max(n, 1), batch=batch, seed=seed if seeds is None else int(seeds.min(initial=0)))
        cfg = sampler_config(self.facts, steps, eta, guidance, sampler)
        if latents is not None:
            latents = check_latents(latents, n, self.facts.latent_shape)
        chunks = []
        with progress_bar(n, f"sample {self.label}", progress) as bar:
            for s0 in range(0, n, batch):
                sl = slice(s0, min(n, s0 + batch))
                with self._lock:
                    lat = sample_latents(self.engine, self.facts, table, labels[sl], idx_all[sl],
                                         seed if seeds is None else seeds[sl], cfg,
                                         latents=None if latents is None else latents[sl])
                chunks.append(decode(self.decoder, lat, self.facts.scale_factor) if self.decoder is not None else lat)
                bar.update(sl.stop - sl.start)
        return np.concatenate(chunks)

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close:
            close()


def time_ids_slot(b) -> dict | None:
    """Where an SDXL bundle's context carries the six time ids (``PromptEncoder.time_ids``), or None."""
    return b.read_json(layout.TOKENIZER_CONFIG).get("time_ids") if b.has(layout.TOKENIZER_CONFIG) else None


def with_time_ids(b, table: np.ndarray, time_ids) -> np.ndarray:
    """``table`` (encoded prompts) with a call's SDXL time ids (:func:`sdxl_time_ids`) in every row, the zero
    negative prompt's too, as diffusers feeds them; ``table`` itself when ``time_ids`` is None."""
    if time_ids is None:
        return table
    from ptqd.runtime.text import set_time_ids

    return set_time_ids(table.copy(), time_ids_slot(b), time_ids)


def sdxl_time_ids(b, original_size=None, crops_coords_top_left=None, target_size=None) -> list[float] | None:
    """SDXL's six time ids for a call, diffusers' way: original size + crop top-left + target size, each
    defaulting to the pipeline's default call's (image size, (0, 0), image size). None when none is given."""
    given = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
             "target_size": target_size}
    if all(v is None for v in given.values()):
        return None
    slot = time_ids_slot(b)
    if slot is None:
        raise UserError(f"{', '.join(k for k, v in given.items() if v is not None)}: only an SDXL bundle exported by "
                        "this ptqd takes them (its UNet reads the six time ids from the context); this bundle "
                        + ("has them built in: re-export it" if b.has(layout.TOKENIZER_2_CONFIG)
                           else "is not an SDXL bundle"))
    default = slot["default"]
    out = []
    for (name, v), d in zip(given.items(), (default[0:2], default[2:4], default[4:6])):
        if v is None:
            out += list(d)
            continue
        try:
            pair = [float(x) for x in v]
        except (TypeError, ValueError):
            pair = []
        if len(pair) != 2 or not all(np.isfinite(pair)) or min(pair) < 0 or \
                (name != "crops_coords_top_left" and min(pair) <= 0):
            what = "non-negative numbers (top, left)" if name == "crops_coords_top_left" else \
                "positive numbers (height, width)"
            raise UserError(f"{name}: expected two {what}, got {v!r}")
        out += pair
    return out


def check_latents(latents, n: int, latent_shape) -> np.ndarray:
    """Initial noise as float32 [n, C, H, W], or a UserError naming the shape or the values that are wrong."""
    x = np.asarray(latents)
    if x.dtype.kind not in "fiu":
        raise UserError(f"latents: expected a float array, got dtype {x.dtype}")
    want = (n, *latent_shape)
    if x.shape == tuple(latent_shape) and n == 1:
        x = x[None]
    if x.shape != want:
        raise UserError(f"latents: expected shape {want} (images x latent C, H, W), got {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise UserError("latents: holds NaN or infinite values")
    return x


def load_latents(path: str | Path) -> np.ndarray:
    """``--latents FILE.npy``: an array saved by ``np.save`` (no pickles)."""
    try:
        return np.load(Path(path), allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"--latents {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--latents {path}: not a .npy array ({str(e)[:200]}); write it with numpy.save") from None
