"""The CompVis latent-diffusion UNet (``ldm.modules.diffusionmodules.openaimodel.UNetModel``).

Our own implementation of the same computation, with the same parameter names, so a
CompVis checkpoint's ``model.diffusion_model.*`` tensors load into it unchanged.
Options covered are those the latent-diffusion configs use: ``num_heads`` /
``num_head_channels`` (with the ``legacy`` head-width rule), ``use_spatial_transformer``
with ``transformer_depth`` and ``context_dim`` (cross-attention conditioning),
``AttentionBlock`` (QKV legacy and new order), ``use_scale_shift_norm``,
``resblock_updown``, ``conv_resample`` and ``num_classes`` (ADM-style label embedding).

Equivalence with the reference code is checked by ``tests/models/test_compvis_golden.py``
against outputs the reference produced for seeded weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.errors import ModelLoadError
from ptqd.models import attention


@dataclass(frozen=True)
class UNetConfig:
    """The ``unet_config.params`` of a CompVis config (names as in the YAML)."""

    in_channels: int
    out_channels: int
    model_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    image_size: int = 32
    dropout: float = 0.0
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    legacy: bool = True
    # Accepted and ignored: they change memory or dtype, not what is computed in FP32.
    ignored: dict = field(default_factory=dict, compare=False)

    _IGNORED = ("use_checkpoint", "use_fp16")

    # name -> (kind, lo, hi): what the YAML may hold; sizes far beyond any published LDM are refused
    # up front, before torch is asked to allocate them.
    _TYPES: ClassVar[dict[str, tuple]] = {
        "in_channels": (int, 1, 4096), "out_channels": (int, 1, 4096), "model_channels": (int, 32, 8192),
        "num_res_blocks": (int, 0, 64), "image_size": (int, 1, 4096), "dropout": (float, 0.0, 1.0),
        "conv_resample": (bool, None, None), "dims": (int, 1, 3), "num_classes": (int, 1, 1 << 24),
        "num_heads": (int, -1, 1024), "num_head_channels": (int, -1, 8192), "num_heads_upsample": (int, -1, 1024),
        "use_scale_shift_norm": (bool, None, None), "resblock_updown": (bool, None, None),
        "use_new_attention_order": (bool, None, None), "use_spatial_transformer": (bool, None, None),
        "transformer_depth": (int, 1, 64), "context_dim": (int, 1, 1 << 16), "legacy": (bool, None, None),
    }
    _LISTS: ClassVar[dict[str, tuple]] = {"attention_resolutions": (0, 16, 1, 4096), "channel_mult": (1, 8, 1, 64)}  # (min len, max len, lo, hi)
    MAX_PARAMETERS: ClassVar[float] = 5e9  # ~20 GB of FP32 weights: well past any published LDM UNet

    @classmethod
    def from_params(cls, params: dict) -> "UNetConfig":
        from ptqd.validate import config_value

        if not isinstance(params, dict):
            raise ModelLoadError(f"config: unet_config.params must be a mapping, got {type(params).__name__}")
        known = {f.name for f in fields(cls)} - {"ignored"}
        unknown = sorted(map(str, set(params) - known - set(cls._IGNORED)))
        if unknown:
            raise ModelLoadError(
                f"unet_config.params has options ptqd does not implement: {', '.join(unknown)}; "
                "supported are the options used by the CompVis latent-diffusion configs"
            )
        kw = {k: v for k, v in params.items() if k in known}
        if isinstance(kw.get("context_dim"), (list, tuple)):
            raise ModelLoadError("a list of context_dim values (one per transformer block) is not supported")
        for key, v in kw.items():
            where = f"unet_config.params.{key}"
            if key in cls._LISTS:
                n_lo, n_hi, lo, hi = cls._LISTS[key]
                if not isinstance(v, (list, tuple)) or not n_lo <= len(v) <= n_hi:
                    raise ModelLoadError(f"config: {where} must be a list of {n_lo} to {n_hi} integers, got {v!r}"[:300])
                kw[key] = tuple(config_value(f"{where}[{i}]", x, int, lo, hi, ModelLoadError) for i, x in enumerate(v))
            elif v is None and key in ("num_classes", "context_dim"):
                continue
            else:
                kind, lo, hi = cls._TYPES[key]
                kw[key] = config_value(where, v, kind, lo, hi, ModelLoadError)
        for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "attention_resolutions"):
            if key not in kw:
                raise ModelLoadError(f"config: unet_config.params has no {key}")
        cfg = cls(**kw, ignored={k: params[k] for k in cls._IGNORED if k in params})
        cfg.validate()
        return cfg

    def approx_parameters(self) -> float:
        """Rough UNet weight count (3x3 convs of the res blocks, attention), to refuse absurd configs early."""
        n = 0.0
        for mult in self.channel_mult:
            ch = self.model_channels * mult
            per_block = 18 * ch * ch + (16 * ch * ch * self.transformer_depth if self.use_spatial_transformer else 4 * ch * ch)
            n += (2 * self.num_res_blocks + 1) * per_block
        return n

    def validate(self) -> None:
        if self.dims != 2:
            raise ModelLoadError(f"only 2-D UNets are supported (dims=2), config has dims={self.dims}")
        if self.use_spatial_transformer != (self.context_dim is not None):
            raise ModelLoadError(
                "use_spatial_transformer and context_dim go together: set both (cross-attention "
                "conditioning) or neither"
            )
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ModelLoadError("set num_heads or num_head_channels in unet_config.params")
        for key in ("num_heads", "num_head_channels", "num_heads_upsample"):
            if getattr(self, key) == 0:
                raise ModelLoadError(f"config: unet_config.params.{key} must be -1 (unset) or >= 1, got 0")
        if self.num_head_channels > self.model_channels:
            raise ModelLoadError(f"config: num_head_channels={self.num_head_channels} is wider than model_channels="
                                 f"{self.model_channels}: no attention head fits")
        if self.model_channels % 32:
            raise ModelLoadError(
                f"model_channels={self.model_channels} must be a multiple of 32 (GroupNorm with 32 groups)"
            )
        if self.approx_parameters() > self.MAX_PARAMETERS:
            raise ModelLoadError(
                f"unet_config.params describe a UNet of about {self.approx_parameters() / 1e9:.0f} billion parameters "
                f"(model_channels {self.model_channels}, channel_mult {list(self.channel_mult)}, num_res_blocks "
                f"{self.num_res_blocks}); more than {self.MAX_PARAMETERS / 1e9:.0f} billion is not a model ptqd can "
                "export: check the config"
            )


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f_i), sin(t·f_i)], f_i = max_period^(-i/half).  t: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    # UNet blocks use GroupNorm32 (eps 1e-5); the spatial transformer's Normalize uses 1e-6.
    return nn.GroupNorm(32, channels, eps=eps)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=1)
        else:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels=None, use_scale_shift_norm=False,
                 up=False, down=False, dropout=0.0):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(group_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            group_norm(out_channels), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions with a 1-D conv for qkv (ADM style, no context)."""

    def __init__(self, channels, num_heads=1, num_head_channels=-1, new_order=False):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.new_order = new_order
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, hh, ww = x.shape
        x = x.reshape(b, c, hh * ww)
        qkv = self.qkv(self.norm(x))  # [B, 3C, T]
        n, t = self.num_heads, hh * ww
        ch = c // n
        if self.new_order:  # q, k, v chunks first, then heads
            q, k, v = (z.reshape(b * n, ch, t) for z in qkv.chunk(3, dim=1))
        else:  # heads first, then q, k, v inside each head
            q, k, v = qkv.reshape(b * n, 3 * ch, t).split(ch, dim=1)
        scale = 1.0 / math.sqrt(math.sqrt(ch))
        # The reference's einsums as batched matmuls (ONNX MatMul, not Einsum): w [B*n, Tq, Tk], a [B*n, ch, Tq]
        w = torch.softmax(attention.bmm((q * scale).transpose(1, 2), k * scale), dim=-1)
        a = attention.bmm(v, w.transpose(1, 2)).reshape(b, c, t)
        return (x + self.proj_out(a)).reshape(b, c, hh, ww)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, _ = q.shape
        h = self.heads
        # [B, N, h*d] -> [B*h, N, d]
        q, k, v = (z.reshape(b, z.shape[1], h, -1).transpose(1, 2).reshape(b * h, z.shape[1], -1) for z in (q, k, v))
        attn = torch.softmax(attention.bmm(q, k.transpose(1, 2)) * self.scale, dim=-1)
        out = attention.bmm(attn, v).reshape(b, h, n, -1).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head)  # self-attention
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, channels, n_heads, d_head, depth, context_dim):
        super().__init__()
        inner = n_heads * d_head
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x))
        y = y.reshape(b, y.shape[1], h * w).transpose(1, 2)  # [B, HW, C']
        for block in self.transformer_blocks:
            y = block(y, context)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        return self.proj_out(y) + x


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """``forward(x [B,C,H,W], timesteps [B], context [B,L,D] | None, y [B] | None) -> eps [B,C',H,W]``."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        mc, nrb = cfg.model_channels, cfg.num_res_blocks
        ted = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, ted)

        num_heads = cfg.num_heads
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def attention(ch: int, upsampling: bool) -> nn.Module:
            # The reference reassigns num_heads while building (num_head_channels != -1), and the
            # legacy rule then picks the head width: keep both quirks for key compatibility.
            nonlocal num_heads
            if cfg.num_head_channels == -1:
                dim_head = ch // num_heads
            else:
                num_heads = ch // cfg.num_head_channels
                dim_head = cfg.num_head_channels
            if cfg.legacy:
                dim_head = ch // num_heads if cfg.use_spatial_transformer else cfg.num_head_channels
            if cfg.use_spatial_transformer:
                return SpatialTransformer(ch, num_heads, dim_head, cfg.transformer_depth, cfg.context_dim)
            return AttentionBlock(ch, heads_up if upsampling else num_heads, dim_head, cfg.use_new_attention_order)

        def resblock(ch, out=None, up=False, down=False):
            return ResBlock(ch, ted, out, cfg.use_scale_shift_norm, up=up, down=down, dropout=cfg.dropout)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(nrb):
                layers = [resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch, upsampling=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = resblock(ch, ch, down=True) if cfg.resblock_updown else Downsample(ch, cfg.conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch, upsampling=False), resblock(ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(nrb + 1):
                layers = [resblock(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(attention(ch, upsampling=True))
                if level and i == nrb:
                    layers.append(resblock(ch, ch, up=True) if cfg.resblock_updown else Upsample(ch, cfg.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels))
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)
