"""Load a CompVis latent-diffusion checkpoint (``.ckpt`` or ``.safetensors``) with its YAML config.

Key layout (``LatentDiffusion.state_dict()``):
  ``model.diffusion_model.*``         the UNet
  ``first_stage_model.*``             the autoencoder (only the decoder half is kept)
  ``cond_stage_model.embedding.weight`` the ClassEmbedder table [n_classes, embed_dim]
  ``betas``, ``alphas_cumprod``, ...  schedule buffers (checked against the config)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ptqd.errors import ModelLoadError, UserError
from ptqd.facts import Conditioning, ModelFacts, NoiseSchedule
from ptqd.models.compvis_unet import UNetConfig, UNetModel
from ptqd.models.first_stage import DecoderConfig, FirstStageDecoder
from ptqd.models.loaded import EpsModel, LoadedModel, load_strict, safe_load_state_dict

UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
# Everything else LatentDiffusion registers; the schedule buffers are cross-checked, the rest ignored.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "scale_factor",
)
IGNORED_PREFIXES = ("model_ema.",)
# model.params of LatentDiffusion / DDPM: what ptqd reads, what only matters for training (accepted and
# ignored), and what would change the sampled model if set, so is only accepted at its default.
MODEL_PARAMS_USED = (
    "unet_config", "first_stage_config", "cond_stage_config", "conditioning_key", "timesteps", "beta_schedule",
    "linear_start", "linear_end", "parameterization", "scale_factor", "image_size", "channels",
)
MODEL_PARAMS_TRAINING = (
    "loss_type", "ckpt_path", "ignore_keys", "load_only_unet", "monitor", "use_ema", "first_stage_key",
    "log_every_t", "clip_denoised", "original_elbo_weight", "v_posterior", "l_simple_weight", "scheduler_config",
    "learn_logvar", "logvar_init", "num_timesteps_cond", "cond_stage_key", "cond_stage_trainable", "concat_mode",
    "scale_by_std", "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates",
)
MODEL_PARAMS_DEFAULT_ONLY = {"given_betas": None, "cosine_s": 8e-3, "use_positional_encodings": False,
                             "cond_stage_forward": None}  # EMA copies and counters; deployment uses model.diffusion_model
# Decoder-side modules of the first stage; encoder, quant_conv and loss are not needed to sample.
FIRST_STAGE_UNUSED = ("encoder.", "quant_conv.", "loss.")

CIN256_V2 = {
    "model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 64, "channels": 3,
            "cond_stage_key": "class_label", "conditioning_key": "crossattn",
            "unet_config": {
                "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                "params": {
                    "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
                    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
                    "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512,
                },
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.VQModelInterface",
                "params": {
                    "embed_dim": 3, "n_embed": 8192,
                    "ddconfig": {
                        "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3,
                        "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                    },
                },
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"},
            },
        },
    }
}
"""``configs/latent-diffusion/cin256-v2.yaml`` (LDM-4 ImageNet) as a dict, for tests and sizing."""


def read_config(path: Path) -> dict:
    import yaml

    if not path.exists():
        raise UserError(f"config not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ModelLoadError(f"{path.name} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise ModelLoadError(f"{path.name} is not a latent-diffusion config (no top-level 'model' key)")
    return cfg


def _schedule(params: dict) -> NoiseSchedule:
    from ptqd.validate import config_value

    name = params.get("beta_schedule", "linear")
    kinds = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
    if not isinstance(name, str) or name not in kinds:
        raise ModelLoadError(f"beta_schedule {name!r} is not supported; expected one of {sorted(kinds)}")
    T = config_value("model.params.timesteps", params.get("timesteps", 1000), int, 2, 1_000_000, ModelLoadError)
    start = config_value("model.params.linear_start", params.get("linear_start", 1e-4), float, error=ModelLoadError)
    end = config_value("model.params.linear_end", params.get("linear_end", 2e-2), float, error=ModelLoadError)
    try:
        return NoiseSchedule(kind=kinds[name], num_train_timesteps=T, beta_start=start if name != "cosine" else None,
                             beta_end=end if name != "cosine" else None)
    except ValueError as e:
        raise ModelLoadError(f"config: the noise schedule (beta_schedule {name}, linear_start {start}, linear_end "
                             f"{end}, timesteps {T}) is not valid: {e}") from None


def _check_model_params(params: dict) -> None:
    """Refuse what ptqd would otherwise silently ignore: unknown options, and options that change the
    sampled model away from what ptqd implements."""
    known = set(MODEL_PARAMS_USED) | set(MODEL_PARAMS_TRAINING) | set(MODEL_PARAMS_DEFAULT_ONLY)
    unknown = sorted(str(k) for k in params if k not in known)
    if unknown:
        raise ModelLoadError(f"config: model.params has option(s) ptqd does not know: {', '.join(unknown)}; "
                             "remove them, or report them if the checkpoint needs them")
    for k, default in MODEL_PARAMS_DEFAULT_ONLY.items():
        if k in params and params[k] != default:
            raise ModelLoadError(f"config: model.params.{k} = {params[k]!r} is not supported (ptqd implements "
                                 f"{k} = {default!r})"[:300])


def parse_config(cfg: dict):
    """Config dict -> (UNetConfig, DecoderConfig | None, Conditioning, NoiseSchedule, params)."""
    try:
        params = cfg["model"]["params"]
        unet_params = params["unet_config"]["params"]
    except (KeyError, TypeError, IndexError):
        raise ModelLoadError("config has no model.params.unet_config.params section") from None
    if not isinstance(params, dict) or not isinstance(unet_params, dict):
        raise ModelLoadError("config: model.params and unet_config.params must be mappings")
    _check_model_params(params)
    if params.get("parameterization", "eps") != "eps":
        raise ModelLoadError(f"parameterization {params['parameterization']!r} is not supported (only 'eps')")
    unet_cfg = UNetConfig.from_params(dict(unet_params))
    key = params.get("conditioning_key")
    cond_cfg = params.get("cond_stage_config")
    if key in (None, "none") or cond_cfg in (None, "__is_unconditional__"):
        if unet_cfg.context_dim is not None:
            raise ModelLoadError("the UNet expects a cross-attention context but the config has no conditioning")
        cond = Conditioning()
    elif key == "crossattn" and isinstance(cond_cfg, dict) and str(cond_cfg.get("target", "")).endswith("ClassEmbedder"):
        from ptqd.validate import config_value

        cp = cond_cfg.get("params", {})
        if not isinstance(cp, dict):
            raise ModelLoadError("config: cond_stage_config.params must be a mapping")
        unknown = sorted(str(k) for k in cp if k not in ("n_classes", "embed_dim", "key", "ucg_rate"))
        if unknown:
            raise ModelLoadError(f"config: cond_stage_config.params has option(s) ptqd does not know: "
                                 f"{', '.join(unknown)}")
        n = config_value("cond_stage_config.params.n_classes", cp.get("n_classes", 1000), int, 2, 1 << 24,
                         ModelLoadError)
        dim = config_value("cond_stage_config.params.embed_dim", cp.get("embed_dim"), int, 1, 1 << 16,
                           ModelLoadError)
        if dim != unet_cfg.context_dim:
            raise ModelLoadError(f"ClassEmbedder embed_dim={dim} but the UNet's context_dim={unet_cfg.context_dim}")
        # CompVis class-conditional models reserve the last class as the unconditional one.
        cond = Conditioning(kind="class", num_classes=n, null_class=n - 1, context_dim=dim, context_tokens=1)
    else:
        target = cond_cfg.get("target") if isinstance(cond_cfg, dict) else cond_cfg
        if any(k in str(target) for k in ("CLIPEmbedder", "BERTEmbedder", "OpenCLIP", "Transformer")):
            raise ModelLoadError(
                f"text-conditioned CompVis checkpoints ({str(target).rsplit('.', 1)[-1]}) are not supported directly: "
                "convert the checkpoint to a diffusers pipeline (diffusers' "
                "scripts/convert_original_stable_diffusion_to_diffusers.py) and give ptqd that directory")
        raise ModelLoadError(
            f"conditioning {key!r} with {target!r} is not supported; ptqd handles unconditional models and "
            "class-conditional models (crossattn + ClassEmbedder)"
        )
    fs = params.get("first_stage_config")
    if fs is not None and not isinstance(fs, dict):
        raise ModelLoadError(f"config: first_stage_config must be a mapping, got {type(fs).__name__}")
    dec_cfg = DecoderConfig.from_params(str(fs.get("target", "")), fs.get("params", {})) if isinstance(fs, dict) else None
    return unet_cfg, dec_cfg, cond, _schedule(params), params


def _check_schedule(state: dict, schedule: NoiseSchedule) -> None:
    if "alphas_cumprod" not in state:
        return
    ckpt = state["alphas_cumprod"].double().numpy()
    ours = schedule.alphas_cumprod
    if ckpt.shape != ours.shape or not np.allclose(ckpt, ours, rtol=1e-5, atol=1e-7):
        raise ModelLoadError(
            "the config's noise schedule does not match the checkpoint's alphas_cumprod "
            f"(config {schedule.kind} {schedule.beta_start}->{schedule.beta_end}, T={schedule.num_train_timesteps}; "
            f"checkpoint T={ckpt.shape[0]}). Use the config the checkpoint was trained with"
        )


def load_compvis(checkpoint: str | Path, config: str | Path | dict, with_first_stage: bool = True) -> LoadedModel:
    ckpt_path = Path(checkpoint)
    cfg = config if isinstance(config, dict) else read_config(Path(config))
    unet_cfg, dec_cfg, cond, schedule, params = parse_config(cfg)
    state = safe_load_state_dict(ckpt_path)

    groups: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "first": {}, "cond": {}}
    unknown = []
    for k, v in state.items():
        if k.startswith(UNET_PREFIX):
            groups["unet"][k[len(UNET_PREFIX):]] = v
        elif k.startswith(FIRST_STAGE_PREFIX):
            sub = k[len(FIRST_STAGE_PREFIX):]
            if not sub.startswith(FIRST_STAGE_UNUSED):
                groups["first"][sub] = v
        elif k.startswith(COND_PREFIX):
            groups["cond"][k[len(COND_PREFIX):]] = v
        elif k not in SCHEDULE_BUFFERS and not k.startswith(IGNORED_PREFIXES):
            unknown.append(k)
    if unknown:
        raise ModelLoadError(
            f"{ckpt_path.name} has {len(unknown)} unexpected key(s) outside the LatentDiffusion layout: "
            + ", ".join(sorted(unknown)[:8]) + (" ..." if len(unknown) > 8 else "")
        )
    if not groups["unet"]:
        raise ModelLoadError(
            f"{ckpt_path.name} has no '{UNET_PREFIX}*' tensors: is it a CompVis LatentDiffusion checkpoint?"
        )
    _check_schedule(state, schedule)

    unet = UNetModel(unet_cfg)
    load_strict(unet, groups["unet"], f"the UNet in {ckpt_path.name}",
                "Check that --config is the config this checkpoint was trained with")
    unet.eval()

    class_embedding = None
    if cond.kind == "class":
        table = groups["cond"].get("embedding.weight")
        expected = (cond.num_classes, cond.context_dim)
        extra = sorted(set(groups["cond"]) - {"embedding.weight"})
        if table is None or tuple(table.shape) != expected or extra:
            found = "missing" if table is None else f"shape {tuple(table.shape)}"
            raise ModelLoadError(
                f"class embedding {COND_PREFIX}embedding.weight: config expects {expected}, checkpoint has {found}"
                + (f"; unexpected key(s): {', '.join(COND_PREFIX + k for k in extra)}" if extra else "")
            )
        class_embedding = table.float().numpy().copy()

    first_stage = None
    if with_first_stage and dec_cfg is not None:
        first_stage = FirstStageDecoder(dec_cfg)
        load_strict(first_stage, groups["first"], f"the first stage in {ckpt_path.name}",
                    "Check first_stage_config, or export without the decoder")
        first_stage.eval()

    from ptqd.validate import config_value

    if "scale_factor" in state:
        if state["scale_factor"].numel() != 1:
            raise ModelLoadError(f"{ckpt_path.name}: scale_factor must be one number, got shape "
                                 f"{tuple(state['scale_factor'].shape)}")
        scale_factor = float(state["scale_factor"])
    else:
        scale_factor = config_value("model.params.scale_factor", params.get("scale_factor", 1.0), float,
                                    error=ModelLoadError)
    image_size = config_value("model.params.image_size", params.get("image_size", unet_cfg.image_size), int, 1, 4096,
                              ModelLoadError)
    latent = (config_value("model.params.channels", params.get("channels", unet_cfg.in_channels), int, 1, 4096,
                           ModelLoadError), image_size, image_size)
    if latent[0] != unet_cfg.in_channels:
        raise ModelLoadError(f"model.params.channels={latent[0]} but the UNet has in_channels={unet_cfg.in_channels}")
    image_shape = None
    if dec_cfg is not None:
        f = dec_cfg.downsampling
        image_shape = (dec_cfg.out_ch, latent[1] * f, latent[2] * f)
    try:
        facts = ModelFacts(
            family="compvis-ldm", latent_shape=latent, schedule=schedule, conditioning=cond,
            scale_factor=scale_factor, image_shape=image_shape, source=ckpt_path.name,
        )
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"config: the model's facts are not valid ({e})") from None
    has_ctx = cond.kind == "class"
    wrapper = EpsModel(unet, lambda m, x, t, c: m(x, t, context=c), has_context=has_ctx)
    return LoadedModel(unet=wrapper.eval(), facts=facts, class_embedding=class_embedding, first_stage=first_stage)
