"""Load a diffusers UNet (and optionally its VQ/KL decoder) from a local directory.

Accepted layouts (nothing is downloaded; ``local_files_only`` always):

* a pipeline directory: ``unet/`` (+ ``scheduler/scheduler_config.json``, optional
  ``vqvae/`` or ``vae/``, optional ``class_embedding.safetensors``);
* a bare UNet directory (``config.json`` + weights), with the schedule passed explicitly;
* a Stable Diffusion 1.x/2.x pipeline directory (``model_index.json``; ``unet/``, ``text_encoder/``
  (CLIPTextModel), ``tokenizer/``, ``vae/``, ``scheduler/``): a text-conditioned LDM (``ptqd.models.text``).
  The bundle keeps its scheduler (DDIM, PNDM, DPM-Solver++, Euler, Euler ancestral, with their config;
  ``ptqd.runtime.schedulers``) and samples with it; another scheduler is replaced by DDIM, with a note.
  A v-prediction UNet (Stable Diffusion 2.x at 768) is exported with v converted to ε inside the graph
  (``EpsModel``). SDXL (two text encoders, pooled embeddings, added time ids) is refused.

``UNet2DModel`` is an unconditional LDM. ``UNet2DConditionModel`` is a class-conditional
LDM whose class embedding is fed as a one-token cross-attention context: the table lives
in ``class_embedding.safetensors`` (tensor ``embedding.weight`` [num_classes,
cross_attention_dim]; optional metadata ``null_class``, default the last class, the
CompVis convention). diffusers loads ``.bin`` weights with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ptqd.errors import ModelLoadError, UserError
from ptqd.facts import PREDICTION_TYPES, Conditioning, ModelFacts, NoiseSchedule
from ptqd.models.loaded import EpsModel, LoadedModel
from ptqd.models.quiet import quiet_libraries

CLASS_TABLE = "class_embedding.safetensors"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None


def schedule_from_scheduler_config(cfg: dict) -> NoiseSchedule:
    try:
        return _schedule(cfg)
    except (ValueError, TypeError, OverflowError) as e:  # wrong types, or betas outside (0, 1)
        raise ModelLoadError(f"scheduler config: not a valid noise schedule ({e})") from None


def _schedule(cfg: dict) -> NoiseSchedule:
    if not isinstance(cfg, dict):
        raise ModelLoadError("scheduler config must be a JSON object")
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        return NoiseSchedule("explicit", len(cfg["trained_betas"]), betas_explicit=tuple(cfg["trained_betas"]))
    if kind == "squaredcos_cap_v2":
        raise ModelLoadError("beta_schedule 'squaredcos_cap_v2' is not supported yet; pass trained_betas instead")
    if kind not in ("linear", "scaled_linear"):
        raise ModelLoadError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear, trained_betas)")
    return NoiseSchedule(kind, int(cfg.get("num_train_timesteps", 1000)),
                         float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 2e-2)))


def pipeline_sampler(root: Path, scfg: dict) -> dict | None:
    """The pipeline's scheduler as a bundle keeps it ({"class", "config"}), checked against what ptqd's samplers
    reproduce; one that is not is replaced by DDIM on the pipeline's spacing, with a one-line note."""
    import sys

    from ptqd.runtime.schedulers import clean_config, resolve

    if not scfg:
        return None
    cls = scfg.get("_class_name", "DDIMScheduler")
    index = root / "model_index.json"  # what diffusers' from_pretrained instantiates, where the pipeline names it
    if index.exists():
        entry = _read_json(index).get("scheduler")
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
            cls = entry[1]
    stored = {"class": str(cls), "config": clean_config(scfg)}
    try:
        resolve(stored)
        return stored
    except UserError as e:
        fallback = {"class": "DDIMScheduler", "config": dict(stored["config"], clip_sample=False, thresholding=False,
                                                             set_alpha_to_one=False)}
        try:
            resolve(fallback)
        except UserError:
            fallback = None  # CompVis DDIM
        print(f"note: {root.name}: {e}. The bundle samples with DDIM on the pipeline's noise schedule; --sampler "
              "chooses another", file=sys.stderr)
        return fallback


def is_diffusers_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "unet" / "config.json").exists() or (path / "config.json").exists())


def load_diffusers(path: str | Path, schedule: NoiseSchedule | None = None, with_first_stage: bool = True) -> LoadedModel:
    import diffusers

    root = Path(path)
    if not root.exists():
        raise UserError(f"model directory not found: {root}")
    unet_dir = root / "unet" if (root / "unet" / "config.json").exists() else root
    if not (unet_dir / "config.json").exists():
        raise UserError(f"{root} is not a diffusers model: no config.json or unet/config.json")
    ucfg = _read_json(unet_dir / "config.json")
    cls_name = ucfg.get("_class_name")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ModelLoadError(f"{unet_dir}/config.json has _class_name {cls_name!r}; expected UNet2DModel or UNet2DConditionModel")

    sched_file = root / "scheduler" / "scheduler_config.json"
    prediction = "epsilon"
    text = cls_name == "UNet2DConditionModel" and (root / "text_encoder" / "config.json").exists()
    sampler = None
    if schedule is None:
        if not sched_file.exists():
            raise UserError(
                f"{root} has no scheduler/scheduler_config.json: pass the noise schedule explicitly "
                "(--schedule KIND:BETA_START:BETA_END:T, e.g. scaled_linear:0.0015:0.0195:1000)"
            )
        scfg = _read_json(sched_file)
        schedule = schedule_from_scheduler_config(scfg)
        prediction = scfg.get("prediction_type", "epsilon")
        sampler = pipeline_sampler(root, scfg)
    if prediction not in PREDICTION_TYPES:
        raise ModelLoadError(f"prediction_type {prediction!r} is not supported (only "
                             f"{' or '.join(map(repr, PREDICTION_TYPES))})")

    try:
        with quiet_libraries():
            unet = getattr(diffusers, cls_name).from_pretrained(unet_dir, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise ModelLoadError(f"diffusers could not load {unet_dir}: {str(e).splitlines()[0][:300]}") from None
    unet.requires_grad_(False)

    class_embedding = None
    text_encoder = tokenizer = None
    tokenizer_2, zero_empty = None, False
    if text and (root / "text_encoder_2" / "config.json").exists():
        text_encoder, tokenizer, tokenizer_2, cond, call, zero_empty = load_sdxl_conditioning(root, unet)
    elif text:
        from ptqd.models.text import load_text_encoder, load_tokenizer

        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None \
                or unet.config.addition_embed_type is not None:
            raise ModelLoadError(f"{root.name}: a UNet with class or added embeddings but one text encoder is not "
                                 "supported; Stable Diffusion 1.x/2.x and SDXL UNets are")
        text_encoder = load_text_encoder(root / "text_encoder")
        tokenizer = load_tokenizer(root / "tokenizer")
        dim = unet.config.cross_attention_dim
        if text_encoder.model.config.hidden_size != dim:
            raise ModelLoadError(f"{root.name}: the text encoder's hidden size {text_encoder.model.config.hidden_size} "
                                 f"is not the UNet's cross_attention_dim {dim}")
        try:
            cond = Conditioning(kind="text", context_dim=dim, context_tokens=int(tokenizer.model_max_length))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{root.name}: {e}") from None
        call = lambda m, x, t, c: m(x, t, encoder_hidden_states=c, return_dict=False)[0]  # noqa: E731
    elif cls_name == "UNet2DConditionModel":
        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is not None:
            raise ModelLoadError("UNet2DConditionModel with class_embed_type/num_class_embeds (label added to the "
                                 "time embedding) is not supported; ptqd expects the class fed as cross-attention context")
        table_path = next((p / CLASS_TABLE for p in (root, unet_dir) if (p / CLASS_TABLE).exists()), None)
        if table_path is None:
            raise UserError(
                f"UNet2DConditionModel needs a class embedding table: put {CLASS_TABLE} (tensor 'embedding.weight', "
                f"[num_classes, {unet.config.cross_attention_dim}]) in {root}"
            )
        from safetensors import safe_open

        with safe_open(str(table_path), "pt") as f:
            meta = f.metadata() or {}
            if "embedding.weight" not in f.keys():
                raise ModelLoadError(f"{table_path} has no tensor 'embedding.weight' (found: {', '.join(f.keys())})")
            table = f.get_tensor("embedding.weight").float()
        dim = unet.config.cross_attention_dim
        if table.ndim != 2 or table.shape[1] != dim:
            raise ModelLoadError(f"{table_path}: embedding.weight has shape {tuple(table.shape)}, expected [num_classes, {dim}]")
        n = int(table.shape[0])
        try:
            null = int(meta.get("null_class", n - 1))
            cond = Conditioning(kind="class", num_classes=n, null_class=null, context_dim=dim, context_tokens=1)
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"{table_path}: {e}") from None
        class_embedding = table.numpy().copy()
        call = lambda m, x, t, c: m(x, t, encoder_hidden_states=c, return_dict=False)[0]  # noqa: E731
    else:
        cond = Conditioning()
        call = lambda m, x, t, c: m(x, t, return_dict=False)[0]  # noqa: E731

    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    first_stage, image_shape, scale_factor = None, None, 1.0
    for sub, cls in (("vqvae", "VQModel"), ("vae", "AutoencoderKL")):
        if with_first_stage and (root / sub / "config.json").exists():
            with quiet_libraries():
                ae = getattr(diffusers, cls).from_pretrained(root / sub, local_files_only=True).eval()
            ae.requires_grad_(False)
            first_stage = DiffusersDecoder(ae)
            scale_factor = float(getattr(ae.config, "scaling_factor", 1.0)) if cls == "AutoencoderKL" else 1.0
            f = 2 ** (len(ae.config.block_out_channels) - 1)
            image_shape = (ae.config.out_channels, h * f, w * f)
            break
    try:
        facts = ModelFacts(family="diffusers", latent_shape=(unet.config.in_channels, h, w), schedule=schedule,
                           conditioning=cond, prediction_type=prediction, scale_factor=scale_factor,
                           image_shape=image_shape, source=root.name, sampler=sampler)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{root}: the model's facts are not valid ({e})") from None
    eps = EpsModel(unet, call, has_context=cond.kind != "none",
                   v_alphas_cumprod=schedule.alphas_cumprod if prediction == "v_prediction" else None).eval()
    if tokenizer_2 is not None:  # SDXL: the six time ids of the default call (original = target = image size)
        ih, iw = image_shape[1:] if image_shape else (8 * h, 8 * w)
        unet.ptqd_time_ids = (ih, iw, 0, 0, ih, iw)
        text_encoder.time_ids.copy_(torch.tensor(unet.ptqd_time_ids, dtype=torch.float32))
    return LoadedModel(unet=eps, facts=facts, class_embedding=class_embedding, first_stage=first_stage,
                       text_encoder=text_encoder, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                       zero_empty_prompt=zero_empty)


def load_sdxl_conditioning(root: Path, unet):
    """SDXL's text side: both encoders as one (``SDXLTextEncoder``: context tokens then the pooled projection as
    one more token), both tokenizers, and the UNet call that splits that context into ``encoder_hidden_states``
    and the added conditions (``text_embeds``, and the six ``time_ids`` of the pipeline's default call:
    original size = target size = the image size, no crop). Returns (encoder, tokenizer, tokenizer_2,
    conditioning, call, zero_empty_prompt)."""
    from ptqd.models.text import load_sdxl_text_encoders, load_tokenizer

    if unet.config.addition_embed_type != "text_time":
        raise ModelLoadError(f"{root.name}: two text encoders but the UNet's addition_embed_type is "
                             f"{unet.config.addition_embed_type!r}; SDXL's is 'text_time'")
    enc = load_sdxl_text_encoders(root)
    tokenizer, tokenizer_2 = load_tokenizer(root / "tokenizer"), load_tokenizer(root / "tokenizer_2")
    d1, d2 = enc.model.config.hidden_size, enc.model_2.config.hidden_size
    pooled = int(enc.model_2.config.projection_dim)
    dim = unet.config.cross_attention_dim
    if d1 + d2 != dim:
        raise ModelLoadError(f"{root.name}: the text encoders' hidden sizes {d1} + {d2} are not the UNet's "
                             f"cross_attention_dim {dim}")
    want = unet.add_embedding.linear_1.in_features
    if pooled + 6 * unet.config.addition_time_embed_dim != want:
        raise ModelLoadError(f"{root.name}: pooled projection {pooled} + 6 time ids x {unet.config.addition_time_embed_dim}"
                             f" do not make the UNet's added-condition width {want}")
    if pooled > dim or tokenizer.model_max_length != tokenizer_2.model_max_length:
        raise ModelLoadError(f"{root.name}: the pooled projection ({pooled}) must fit in a context token ({dim}) and "
                             "both tokenizers must have one length")
    tokens = int(tokenizer.model_max_length)
    try:
        cond = Conditioning(kind="text", context_dim=dim, context_tokens=tokens + 1)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{root.name}: {e}") from None
    index = _read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    if pooled + 6 <= dim:  # the time ids ride in the pooled token, after the projection: per call
        enc.slot = (tokens, pooled)

    def call(m, x, t, c):
        if enc.slot is not None:
            ids = c[:, tokens, pooled:pooled + 6]
        else:  # no room in the context: the default call's ids, baked into the graph
            ids = torch.tensor([list(m.ptqd_time_ids)], dtype=x.dtype).expand(x.shape[0], 6)
        return m(x, t, encoder_hidden_states=c[:, :tokens], return_dict=False,
                 added_cond_kwargs={"text_embeds": c[:, tokens, :pooled], "time_ids": ids})[0]

    return enc, tokenizer, tokenizer_2, cond, call, bool(index.get("force_zeros_for_empty_prompt", True))


class DiffusersDecoder(torch.nn.Module):
    def __init__(self, ae):
        super().__init__()
        self.ae = ae

    def forward(self, z):
        return self.ae.decode(z, return_dict=False)[0]
