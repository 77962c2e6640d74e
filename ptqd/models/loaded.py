"""What every model loader returns: one torch module with a fixed signature plus its facts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptqd.errors import ModelLoadError, UserError
from ptqd.facts import ModelFacts


class EpsModel(nn.Module):
    """The exported signature: ``forward(x [B,C,H,W], t [B] float32, context [B,L,D]?) -> eps``.

    ``call(unet, x, t, context)`` adapts the source module's own signature. ``v_alphas_cumprod`` (a
    v-prediction UNet, e.g. Stable Diffusion 2.x at 768): the UNet predicts v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀, and the
    graph returns ε = √ᾱ_t·v + √(1−ᾱ_t)·x_t (Salimans & Ho 2022, eq. for v), so calibration, PTQD's correction
    (fitted on ε) and every sampler see ε whatever the model predicts.
    """

    def __init__(self, unet: nn.Module, call, has_context: bool, v_alphas_cumprod=None):
        super().__init__()
        self.unet = unet
        self._call = call
        self.has_context = has_context
        # a fake-quant twin's attention quantizers: a callable giving each forward a fresh hook for
        # ptqd.models.attention (its matmuls counted from the first; ``close()`` after the forward checks
        # that it ran what the hook was made for); None for the FP model
        self.attention_hook = None
        self.v_prediction = v_alphas_cumprod is not None
        if self.v_prediction:  # σ_t = √((1-ᾱ)/ᾱ), interpolated linearly in t between integers as diffusers' σ samplers do
            ab = np.asarray(v_alphas_cumprod, np.float64)
            self.register_buffer("sigmas", torch.from_numpy(np.sqrt((1 - ab) / ab)).float(), persistent=False)

    def forward(self, x, t, context=None):
        if self.attention_hook is None:
            out = self._call(self.unet, x, t, context)
        else:
            from ptqd.models import attention

            hook = self.attention_hook()
            with attention.hooked(hook):
                out = self._call(self.unet, x, t, context)
            hook.close()  # checks that the forward ran what the hook was made for
        if not self.v_prediction:
            return out
        # ε = √ᾱ·v + √(1-ᾱ)·x_t with √ᾱ = 1/√(1+σ²), √(1-ᾱ) = σ/√(1+σ²); a fractional t (Euler on Karras
        # sigmas) takes σ interpolated between its integer neighbours
        lo = t.floor().clamp(0, self.sigmas.shape[0] - 2)
        w = (t - lo).view(-1, 1, 1, 1)
        i = lo.long()
        s = self.sigmas[i].view(-1, 1, 1, 1) * (1 - w) + self.sigmas[i + 1].view(-1, 1, 1, 1) * w
        a = 1 / torch.sqrt(1 + s * s)
        return a * out + (s * a) * x


@dataclass
class LoadedModel:
    unet: EpsModel
    facts: ModelFacts
    # what labels index: [num_classes, context_dim] class embeddings, or (text models, once a bundle binds
    # its prompts) [1 + prompts, tokens, context_dim] encoded prompts, row 0 the negative prompt
    class_embedding: np.ndarray | None = None
    first_stage: nn.Module | None = None  # latent -> image in [-1, 1]
    text_encoder: nn.Module | None = None  # text models: input_ids [B, tokens] int64 -> context [B, tokens, D]
    tokenizer: object | None = None  # text models: the pipeline's tokenizer (transformers), for export
    tokenizer_2: object | None = None  # SDXL: the second encoder's tokenizer (text_encoder then takes two id arrays)
    zero_empty_prompt: bool = False  # SDXL's force_zeros_for_empty_prompt: "" encodes to zeros (no negative prompt)

    def context_for(self, labels) -> torch.Tensor | None:
        """The cross-attention context [B, L, D] for labels (None when unconditional)."""
        if self.class_embedding is None:
            return None
        rows = torch.from_numpy(self.class_embedding)[torch.as_tensor(labels, dtype=torch.long)]
        return rows[:, None, :] if rows.ndim == 2 else rows


def safe_load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors without executing code: safetensors, or ``torch.load(weights_only=True)``.

    A pickle that wants to build arbitrary objects is refused, never run.
    """
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"expected a checkpoint file, got a directory: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(os.fspath(path))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"{path.name} is not a valid safetensors file: {e}") from None
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK..), or, before torch 1.6, a pickle (protocol 2-5: 0x80 0x02..0x05)
    if not (head == b"PK\x03\x04" or len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        what = "it is empty" if not head else f"it starts with bytes {head.hex(' ')}, neither a zip archive nor a pickle"
        raise ModelLoadError(f"{path.name} is not a PyTorch checkpoint ({what}); expected a file written by "
                             "torch.save, or a .safetensors file")
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "pickle" in type(e).__name__.lower():
            raise ModelLoadError(
                f"refused to load {path.name}: it is a pickle that needs arbitrary Python objects, or a damaged "
                f"one ({msg[:160]}). ptqd only loads plain tensors; save the state_dict as safetensors "
                "from a trusted environment and pass that file instead"
            ) from None
        raise ModelLoadError(f"could not read checkpoint {path.name}: {msg[:200]}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path.name} does not hold a state_dict (a mapping of names to tensors, possibly under 'state_dict')"
        )
    return obj


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, hint: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected and mis-shaped tensor at once."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []

    def listing(keys, fmt=str, limit=8):
        more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(fmt(k) for k in keys[:limit]) + more

    if mis:
        problems.append(
            f"{len(mis)} tensor(s) with shapes that do not match the config: "
            + listing(mis, lambda k: f"{k} (config {tuple(own[k].shape)}, checkpoint {tuple(state[k].shape)})", 5)
        )
    if missing:
        problems.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if problems:
        raise ModelLoadError(f"{what} does not match its config: " + "; ".join(problems) + f". {hint}")
    module.load_state_dict(state, strict=True)
