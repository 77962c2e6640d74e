"""A tiny Stable Diffusion 1.x-architecture pipeline with seeded random weights, saved with diffusers'
``save_pretrained``: CLIP text encoder and tokenizer (a small byte-level BPE vocabulary written here),
UNet2DConditionModel, AutoencoderKL, DDIM scheduler with Stable Diffusion's config. Nothing is downloaded.

    python -c "from ptqd.models.tiny_sd import write_tiny_sd_pipeline as w; w('tiny-sd')"
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ptqd.models.tiny import seeded_state_dict

# Merges of the tiny BPE vocabulary (CLIP's format: a space between the two parts, "</w>" ends a word).
TINY_MERGES = ("t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o n</w>", "i n</w>", "r e", "re d</w>",
               "a n", "an d</w>", "o f</w>", "p h", "o t", "ph ot", "phot o</w>")


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols of GPT-2/CLIP BPE, in their order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_vocabulary(directory: Path) -> dict[str, int]:
    """vocab.json + merges.txt of a tiny CLIP tokenizer (every byte, alone and word-final, a few merges)."""
    chars = byte_symbols()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    for m in TINY_MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n")
    return vocab


def _seed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights for every float tensor (integer buffers such as position ids stay as they are)."""
    own = module.state_dict()
    seeded = seeded_state_dict(module, seed)
    module.load_state_dict({k: seeded[k] if v.is_floating_point() else v for k, v in own.items()})
    return module.eval()


def _save(pipe, out: Path, tok_dir: Path) -> Path:
    """``save_pretrained`` the pipeline, then drop the vocabulary folder its tokenizers were read from."""
    pipe.save_pretrained(out)
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return out


def write_tiny_sd_pipeline(out: str | Path, seed: int = 0, latent_size: int = 8, context_dim: int = 32) -> Path:
    """Write the pipeline to ``out``; the UNet's output conv is rescaled to unit-std ε (see
    ``ptqd.models.tiny.unit_eps_state_dict``), so DDIM trajectories stay where a trained model's do."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out)
    tok_dir = out / ".tiny-vocabulary"
    vocab = write_tiny_vocabulary(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    eos = vocab["<|endoftext|>"]
    text_encoder = _seed(CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=context_dim, intermediate_size=2 * context_dim, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos,
        pad_token_id=eos)), seed)
    unet = _seed(diffusers.UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=context_dim, attention_head_dim=8, norm_num_groups=32), seed + 1)
    vae = _seed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
        sample_size=2 * latent_size, norm_num_groups=32), seed + 2)
    with torch.no_grad():  # unit-std ε on N(0, 1) latents at t = 500 with a prompt's context
        ids = torch.from_numpy(tokenizer(["a red cat"], padding="max_length", max_length=77,
                                         return_tensors="np")["input_ids"].astype(np.int64))
        ctx = text_encoder(input_ids=ids)[0]
        x = torch.from_numpy(np.random.RandomState(seed + 3).standard_normal((1, 4, latent_size, latent_size))
                             .astype(np.float32))
        std = float(unet(x, torch.tensor([500.0]), encoder_hidden_states=ctx).sample.std())
        unet.conv_out.weight /= std
        unet.conv_out.bias /= std
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    return _save(pipe, out, tok_dir)


def write_tiny_sdxl_pipeline(out: str | Path, seed: int = 0, latent_size: int = 8, width: int = 32) -> Path:
    """A tiny SDXL-architecture pipeline (``StableDiffusionXLPipeline``, saved with ``save_pretrained``): two CLIP
    text encoders (the second with a projection, whose pooled output conditions the UNet), their tokenizers,
    a UNet with SDXL's added conditions (``addition_embed_type="text_time"``: pooled text embeddings and the six
    size/crop time ids), an AutoencoderKL and SDXL's Euler scheduler config. Seeded random weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    tok_dir = out / ".tiny-vocabulary"
    vocab = write_tiny_vocabulary(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token="!")  # SDXL's second pads with "!"
    eos = vocab["<|endoftext|>"]
    common = dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                  num_hidden_layers=3, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                  eos_token_id=eos, pad_token_id=eos)
    text_encoder = _seed(CLIPTextModel(CLIPTextConfig(**common)), seed)
    text_encoder_2 = _seed(CLIPTextModelWithProjection(CLIPTextConfig(**common, projection_dim=width)), seed + 4)
    time_dim = 8
    unet = _seed(diffusers.UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * width, attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width + 6 * time_dim), seed + 1)
    vae = _seed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
        sample_size=2 * latent_size, norm_num_groups=32, scaling_factor=0.13025), seed + 2)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                               scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                               add_watermarker=False)
    with torch.no_grad():  # unit-std ε on N(0, 1) latents at t = 500 with a prompt's conditioning
        emb, _, pooled, _ = pipe.encode_prompt("a red cat", do_classifier_free_guidance=False)
        size = 2 * latent_size
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        x = torch.from_numpy(np.random.RandomState(seed + 3).standard_normal((1, 4, latent_size, latent_size))
                             .astype(np.float32))
        std = float(unet(x, torch.tensor([500.0]), encoder_hidden_states=emb,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.std())
        unet.conv_out.weight /= std
        unet.conv_out.bias /= std
    return _save(pipe, out, tok_dir)


# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json): 2.57 B parameters
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0)


def sdxl_base_unet(seed: int = 0, device: str = "cpu", sample_size: int | None = None):
    """SDXL base's UNet architecture with diffusers' own initialisation under ``torch.manual_seed(seed)`` (random
    weights; 10.3 GB in float32). ``device="meta"``: shapes only, no memory (for MAC counts). ``sample_size``: the
    latent size the pipeline declares (default SDXL's 128); the architecture and weights do not depend on it."""
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**{**SDXL_BASE_UNET, **({"sample_size": sample_size} if sample_size
                                                                      else {})})
    return unet.eval().requires_grad_(False)


def write_sdxl_base_pipeline(out: str | Path, seed: int = 0, sample_size: int = 128) -> Path:
    """An SDXL pipeline with the full-size base UNet (random weights) and small text encoders and VAE of the
    widths SDXL's UNet needs (768 + 1280 hidden, a 1280 pooled projection; a 4-channel latent, 8x upsampling):
    for exporting, measuring and compiling the real UNet architecture without downloading it. ``sample_size``:
    the latent size (128: SDXL's 1024x1024; 32: the same architecture compiled at 256x256)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    tok_dir = out / ".tiny-vocabulary"
    vocab = write_tiny_vocabulary(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77, pad_token="!")
    eos = vocab["<|endoftext|>"]
    common = dict(vocab_size=len(vocab), intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos, pad_token_id=eos)
    text_encoder = _seed(CLIPTextModel(CLIPTextConfig(**common, hidden_size=768)), seed)
    text_encoder_2 = _seed(CLIPTextModelWithProjection(CLIPTextConfig(**common, hidden_size=1280,
                                                                      projection_dim=1280)), seed + 4)
    vae = _seed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 32, 32), latent_channels=4,
        layers_per_block=1, sample_size=8 * sample_size, norm_num_groups=32, scaling_factor=0.13025), seed + 2)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 timestep_spacing="leading", steps_offset=1)
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                               unet=sdxl_base_unet(seed, sample_size=sample_size),
                                               scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                               add_watermarker=False)
    return _save(pipe, out, tok_dir)
