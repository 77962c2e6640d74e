"""Tiny seeded models in the real checkpoint layouts, for tests and examples.

Weights come from ``numpy.random.RandomState(seed)`` over the sorted state-dict keys, so the
same seed gives the same tensors on every platform and torch version (golden data relies
on that). Scales keep activations O(1) through deep stacks: weights ~ N(0, 1/fan_in).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ptqd.models.compvis import CIN256_V2, parse_config


def seeded_state_dict(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.RandomState(seed)
    out = {}
    for name, t in sorted(module.state_dict().items()):
        shape = tuple(t.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            if "embedding" in name:
                fan_in = 1  # embedding tables: unit-variance rows
            arr = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf == "weight":  # norm scales
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "bias":
            arr = 0.1 * rng.standard_normal(shape)
        else:  # buffers
            arr = t.numpy().astype(np.float64)
        out[name] = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    return out


def tiny_cin_config(model_channels: int = 32, channel_mult=(1, 2), attention_resolutions=(2,), image_size: int = 8,
                    n_classes: int = 11, context_dim: int = 32, **unet_overrides) -> dict:
    """cin256-v2 scaled down: same structure and options, fewer channels, levels and classes."""
    cfg = copy.deepcopy(CIN256_V2)
    p = cfg["model"]["params"]
    p["image_size"] = image_size
    u = p["unet_config"]["params"]
    u.update(image_size=image_size, model_channels=model_channels, channel_mult=list(channel_mult),
             attention_resolutions=list(attention_resolutions), num_res_blocks=1, context_dim=context_dim)
    u.update(unet_overrides)
    p["cond_stage_config"]["params"].update(n_classes=n_classes, embed_dim=context_dim)
    fs = p["first_stage_config"]["params"]
    fs["n_embed"] = 16
    fs["ddconfig"].update(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=image_size * 2)
    return cfg


def tiny_uncond_config(**unet_overrides) -> dict:
    """An unconditional LDM (celebahq/lsun style: AttentionBlock, num_head_channels), scaled down."""
    cfg = tiny_cin_config()
    p = cfg["model"]["params"]
    p.pop("cond_stage_config")
    p["conditioning_key"] = None
    u = p["unet_config"]["params"]
    for k in ("use_spatial_transformer", "transformer_depth", "context_dim", "num_heads"):
        u.pop(k, None)
    u["num_head_channels"] = 16
    u.update(unet_overrides)
    return cfg


def compvis_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full LatentDiffusion-layout state dict for ``cfg`` with seeded weights and schedule buffers."""
    from ptqd.models.compvis_unet import UNetModel
    from ptqd.models.first_stage import FirstStageDecoder

    unet_cfg, dec_cfg, cond, schedule, _ = parse_config(cfg)
    state = {f"model.diffusion_model.{k}": v for k, v in seeded_state_dict(UNetModel(unet_cfg), seed).items()}
    if dec_cfg is not None:
        fs = seeded_state_dict(FirstStageDecoder(dec_cfg), seed + 1)
        state.update({f"first_stage_model.{k}": v for k, v in fs.items()})
    if cond.kind == "class":
        table = np.random.RandomState(seed + 2).standard_normal((cond.num_classes, cond.context_dim))
        state["cond_stage_model.embedding.weight"] = torch.from_numpy(table.astype(np.float32))
    betas = schedule.betas
    state["betas"] = torch.from_numpy(betas.astype(np.float32))
    state["alphas_cumprod"] = torch.from_numpy(schedule.alphas_cumprod.astype(np.float32))
    return state


def write_compvis_checkpoint(path: str | Path, cfg: dict, seed: int = 0) -> Path:
    """Write a CompVis-style checkpoint (``.ckpt``: {'state_dict': ...}; ``.safetensors``) and its YAML."""
    import yaml

    path = Path(path)
    state = compvis_state_dict(cfg, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": 0}, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# The cin256-v2 (LDM-4 ImageNet) family at three sizes, same structure and options as the paper's model:
# channel_mult 1,2,3,5, attention at downsampling 8, 4, 2, spatial transformer (context 512), 2 res blocks,
# 1001 classes. "full" is cin256-v2 itself (400.9 M parameters, 104.2 GMAC per forward at 64x64x3).
CIN256_SIZES = {
    "small": {"model_channels": 32, "image_size": 16},  # 5.2 M parameters: the default test suite's compile
    "mid": {"model_channels": 64, "image_size": 32},  # 47.0 M parameters, 6.6 GMAC
    "full": {"model_channels": 192, "image_size": 64},  # 400.9 M parameters, 104.2 GMAC
}


def cin256_family_config(size: str = "mid") -> dict:
    """cin256-v2's config at one of :data:`CIN256_SIZES` (UNet only; no first stage)."""
    if size not in CIN256_SIZES:
        raise ValueError(f"size must be one of {', '.join(CIN256_SIZES)}, got {size!r}")
    cfg = copy.deepcopy(CIN256_V2)
    p = cfg["model"]["params"]
    p.pop("first_stage_config")
    s = CIN256_SIZES[size]
    p["image_size"] = s["image_size"]
    p["unet_config"]["params"].update(s)
    return cfg


def unit_eps_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`compvis_state_dict` with the UNet's output conv rescaled so that ε has unit std on
    N(0, 1) latents (t = 500, class 0), as a trained model's does.

    Random weights otherwise predict ε with a std of 10-20 (every residual branch adds variance), and
    DDIM trajectories driven by such ε leave N(0, 1) by two orders of magnitude (x_t std 67 at t = 1
    on the 47 M model): the calibration then sees latents no trained model produces."""
    from ptqd.models.compvis_unet import UNetModel

    state = compvis_state_dict(cfg, seed)
    unet_cfg, *_ = parse_config(cfg)
    pre = "model.diffusion_model."
    unet = UNetModel(unet_cfg)
    unet.load_state_dict({k[len(pre):]: v for k, v in state.items() if k.startswith(pre)})
    p = cfg["model"]["params"]
    c, hw = p["channels"], p["image_size"]
    x = torch.from_numpy(np.random.RandomState(seed + 3).standard_normal((2, c, hw, hw)).astype(np.float32))
    ctx = state.get("cond_stage_model.embedding.weight")
    with torch.no_grad():
        eps = unet(x, torch.full((2,), 500.0), context=None if ctx is None else ctx[:2][:, None, :])
    std = float(eps.std())
    for k in (f"{pre}out.2.weight", f"{pre}out.2.bias"):
        state[k] = state[k] / std
    return state


def write_cin256_family(path: str | Path, size: str = "mid", seed: int = 0) -> Path:
    """A seeded random-weight checkpoint (safetensors) + YAML of the cin256-v2 family at ``size``, with
    unit-std ε (:func:`unit_eps_state_dict`)."""
    import yaml
    from safetensors.torch import save_file

    path = Path(path)
    cfg = cin256_family_config(size)
    save_file(unit_eps_state_dict(cfg, seed), str(path))
    path.with_suffix(".yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
