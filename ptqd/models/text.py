"""Text conditioning of Stable Diffusion-family pipelines: the CLIP text encoder and its tokenizer (torch and
transformers; the runtime's torch-free side is :mod:`ptqd.runtime.text`).

The tokenizer travels in the bundle as a ``tokenizers`` file (``tokenizer.json``) plus the settings the
pipeline applies on every call (pad to ``max_length`` with the pad token, truncate keeping BOS/EOS), so the
runtime reproduces the pipeline's ids with the ``tokenizers`` library alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptqd.errors import MissingDependencyError, ModelLoadError
from ptqd.models.quiet import quiet_libraries

# The calibration prompts when none are given (`--prompts FILE`): varied subjects, styles and lengths.
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red cat sitting on a wooden table, studio lighting",
    "an oil painting of a lighthouse in a storm",
    "a bowl of fruit, still life, high detail",
    "a watercolor landscape with mountains and a lake at sunrise",
    "portrait of an old man with a beard, black and white photo",
    "a futuristic city skyline at night, neon lights",
    "a small dog running on the beach",
)


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("text-to-image pipelines need transformers: pip install transformers") from None
    return transformers


class TextEncoder(torch.nn.Module):
    """The exported signature: ``forward(input_ids [B, tokens] int64) -> context [B, tokens, D]`` (the last
    hidden state, what Stable Diffusion 1.x/2.x feed the UNet)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, return_dict=False)[0]


class SDXLTextEncoder(torch.nn.Module):
    """SDXL's two encoders as one exported graph: ``forward(input_ids, input_ids_2) -> context [B, tokens + 1, D]``.

    Tokens 0..tokens-1: both encoders' penultimate hidden states concatenated (D = D₁ + D₂), what SDXL's UNet
    cross-attends to. The last token: the second encoder's pooled projection (``text_embeds``, P ≤ D values)
    padded with zeros to D, which the UNet's added conditions take. Carrying it as one more context token keeps
    the UNet's signature (x, t, context) for every stage; the exported UNet slices it back out.

    Right after the pooled projection (where P + 6 ≤ D, as in SDXL: 1280 + 6 ≤ 2048), that token also carries
    the six micro-conditioning ``time_ids`` (original size, crop top-left, target size): the encoder writes the
    pipeline's default call's ids (``time_ids``), and a call with other sizes overwrites those six values
    (``ptqd.runtime.text.set_time_ids``), so the exported UNet takes them per call."""

    def __init__(self, model, model_2):
        super().__init__()
        self.model, self.model_2 = model, model_2
        self.register_buffer("time_ids", torch.zeros(6))
        self.slot = None  # (token, offset) of the time ids in the context, where they fit

    def forward(self, input_ids, input_ids_2):
        h1 = self.model(input_ids=input_ids, output_hidden_states=True, return_dict=False)[2][-2]
        pooled, _, hidden = self.model_2(input_ids=input_ids_2, output_hidden_states=True, return_dict=False)[:3]
        ctx = torch.cat([h1, hidden[-2]], dim=-1)
        if self.slot is not None:
            pooled = torch.cat([pooled, self.time_ids.to(pooled.dtype).expand(pooled.shape[0], 6)], dim=-1)
        extra = torch.nn.functional.pad(pooled, (0, ctx.shape[-1] - pooled.shape[-1]))[:, None, :]
        return torch.cat([ctx, extra], dim=1)

    def time_ids_record(self) -> dict | None:
        """What the runtime needs to zero an empty prompt's context and to write per-call ids: the slot and the
        default ids (None where the ids do not fit the context and stay baked into the UNet)."""
        if self.slot is None:
            return None
        return {"token": int(self.slot[0]), "offset": int(self.slot[1]),
                "default": [float(v) for v in self.time_ids.tolist()]}




def load_sdxl_text_encoders(root: Path) -> SDXLTextEncoder:
    transformers = _transformers()
    first = load_text_encoder(root / "text_encoder").model
    try:
        with quiet_libraries():
            second = transformers.CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2",
                                                                             local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"transformers could not load the text encoder {root / 'text_encoder_2'}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    second.requires_grad_(False)
    return SDXLTextEncoder(first, second).eval()


def load_text_encoder(directory: Path) -> TextEncoder:
    transformers = _transformers()
    try:
        with quiet_libraries():
            model = transformers.CLIPTextModel.from_pretrained(directory, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"transformers could not load the text encoder {directory}: "
                             f"{str(e).splitlines()[0][:300]}") from None
    model.requires_grad_(False)
    return TextEncoder(model).eval()


def load_tokenizer(directory: Path):
    transformers = _transformers()
    try:
        with quiet_libraries():
            return transformers.CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ModelLoadError(f"transformers could not load the tokenizer {directory}: "
                             f"{str(e).splitlines()[0][:300]}") from None


def tokenizer_files(tokenizer, zero_empty_prompt: bool = False, time_ids: dict | None = None) -> tuple[str, dict]:
    """(tokenizer.json text, settings) for the runtime: what ``tokenizers`` needs to give the pipeline's ids, and,
    for SDXL, where the context carries the time ids (``SDXLTextEncoder.time_ids_record``)."""
    config = {"max_length": int(tokenizer.model_max_length), "pad_token": str(tokenizer.pad_token),
              "pad_id": int(tokenizer.pad_token_id), "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
              "zero_empty_prompt": bool(zero_empty_prompt)}
    if time_ids is not None:
        config["time_ids"] = time_ids
    return tokenizer.backend_tokenizer.to_str(), config


def token_ids(tokenizer, prompts: list[str]) -> np.ndarray:
    """The pipeline's own ids: padded to max_length, truncated ([N, max_length] int64)."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int64)


def model_token_ids(loaded, prompts: list[str]) -> list[np.ndarray]:
    """The text encoder's inputs for ``prompts``: one id array per tokenizer (SDXL has two)."""
    return [token_ids(t, prompts) for t in (loaded.tokenizer, loaded.tokenizer_2) if t is not None]


@torch.no_grad()
def encode_prompts(loaded, prompts: list[str], batch: int = 16) -> np.ndarray:
    """The context of each prompt ([N, tokens, D] float32), with the torch text encoder. An empty prompt gives
    zeros where the pipeline says so (SDXL's ``force_zeros_for_empty_prompt``: no negative prompt, zero
    embeddings)."""
    ids = model_token_ids(loaded, prompts)
    out = [loaded.text_encoder(*(torch.from_numpy(a[i:i + batch]) for a in ids)).float().numpy()
           for i in range(0, len(prompts), batch)]
    ctx = np.concatenate(out).astype(np.float32)
    if loaded.zero_empty_prompt:
        slot = getattr(loaded.text_encoder, "time_ids_record", lambda: None)()
        from ptqd.runtime.text import zero_prompts

        zero_prompts(ctx, [k for k, p in enumerate(prompts) if p == ""], slot)
    return ctx
