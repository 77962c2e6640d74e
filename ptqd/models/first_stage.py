"""First-stage decoders of latent diffusion: latent z -> image in [-1, 1].

Our implementation of CompVis ``ldm.modules.diffusionmodules.model.Decoder`` with the
VQ (``VQModelInterface``: nearest-codebook quantization, then ``post_quant_conv``) and KL
(``AutoencoderKL``: ``post_quant_conv`` only) heads, parameter names as in the
checkpoint's ``first_stage_model.*``. Only decoding is needed to deploy a sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptqd.errors import ModelLoadError


@dataclass(frozen=True)
class DecoderConfig:
    """``first_stage_config.params.ddconfig`` plus the head (``vq`` or ``kl``)."""

    ch: int
    out_ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    embed_dim: int
    kind: str = "vq"  # "vq" | "kl"
    n_embed: int | None = None
    tanh_out: bool = False

    DDCONFIG_KEYS = ("double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
                     "num_res_blocks", "attn_resolutions", "dropout", "attn_type", "use_linear_attn", "tanh_out",
                     "give_pre_end", "resamp_with_conv")
    MAX_PARAMETERS = 5e9

    @classmethod
    def from_params(cls, target: str, params: dict) -> "DecoderConfig":
        from ptqd.validate import config_value

        if not isinstance(params, dict):
            raise ModelLoadError("config: first_stage_config.params must be a mapping")
        dd = params.get("ddconfig") or {}
        if not isinstance(dd, dict):
            raise ModelLoadError("config: first_stage_config.params.ddconfig must be a mapping")
        if target.endswith(("VQModelInterface", "VQModel")):
            kind = "vq"
        elif target.endswith("AutoencoderKL"):
            kind = "kl"
        else:
            raise ModelLoadError(
                f"first_stage_config.target {target!r} is not supported; expected "
                "ldm.models.autoencoder.VQModelInterface or AutoencoderKL"
            )
        unknown = sorted(str(k) for k in dd if k not in cls.DDCONFIG_KEYS)
        if unknown:
            raise ModelLoadError(f"config: first_stage_config.params.ddconfig has option(s) ptqd does not know: "
                                 f"{', '.join(unknown)}")
        attn_type = dd.get("attn_type", "vanilla")
        if attn_type != "vanilla" or dd.get("use_linear_attn"):
            raise ModelLoadError(f"first-stage attention type {attn_type!r} is not supported (only 'vanilla')")
        if dd.get("give_pre_end", False) is not False or dd.get("resamp_with_conv", True) is not True:
            raise ModelLoadError("config: first-stage give_pre_end and resamp_with_conv are only supported at their "
                                 "defaults (false, true)")

        def need(d: dict, key: str, section: str, lo: int, hi: int) -> int:
            if key not in d:
                raise ModelLoadError(f"first_stage_config is missing {key!r}")
            return config_value(f"{section}.{key}", d[key], int, lo, hi, ModelLoadError)

        def ints(key: str, default=None, n_lo: int = 0) -> tuple[int, ...]:
            v = dd.get(key, default)
            if v is None:
                raise ModelLoadError(f"first_stage_config is missing {key!r}")
            if not isinstance(v, (list, tuple)) or not n_lo <= len(v) <= 16:
                raise ModelLoadError(f"config: ddconfig.{key} must be a list of integers, got {v!r}"[:300])
            return tuple(config_value(f"ddconfig.{key}[{i}]", x, int, 1, 16384, ModelLoadError) for i, x in enumerate(v))

        ch_mult = ints("ch_mult", n_lo=1)
        if len(ch_mult) > 8 or max(ch_mult) > 64:
            raise ModelLoadError(f"config: ddconfig.ch_mult {list(ch_mult)}: at most 8 levels of at most 64x")
        cfg = cls(
            ch=need(dd, "ch", "ddconfig", 1, 8192), out_ch=need(dd, "out_ch", "ddconfig", 1, 4096), ch_mult=ch_mult,
            num_res_blocks=need(dd, "num_res_blocks", "ddconfig", 0, 64),
            attn_resolutions=ints("attn_resolutions", ()),
            resolution=need(dd, "resolution", "ddconfig", 1, 16384),
            z_channels=need(dd, "z_channels", "ddconfig", 1, 4096),
            embed_dim=need(params, "embed_dim", "first_stage_config.params", 1, 4096), kind=kind,
            n_embed=need(params, "n_embed", "first_stage_config.params", 1, 1 << 24) if kind == "vq" else None,
            tanh_out=config_value("ddconfig.tanh_out", dd.get("tanh_out", False), bool, error=ModelLoadError),
        )
        approx = sum(18 * (cfg.ch * m) ** 2 * (cfg.num_res_blocks + 1) for m in cfg.ch_mult)
        if approx > cls.MAX_PARAMETERS:
            raise ModelLoadError(f"first_stage_config describes a decoder of about {approx / 1e9:.0f} billion "
                                 "parameters: check the config")
        return cfg

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def vae_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = vae_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = vae_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(0.0)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        self.same = cin == cout

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.same else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = vae_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).transpose(1, 2)  # [B, T, C]
        k = self.k(h).reshape(b, c, hh * ww)  # [B, C, T]
        v = self.v(h).reshape(b, c, hh * ww)
        w = torch.softmax(torch.bmm(q, k) * (int(c) ** -0.5), dim=2)  # [B, Tq, Tk]
        out = torch.bmm(v, w.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        n = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in)
        self.up = nn.ModuleList()
        for level in reversed(range(n)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = _Upsample(block_in)
                res *= 2
            self.up.insert(0, up)
        self.norm_out = vae_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, padding=1)
        self.tanh_out = cfg.tanh_out

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(len(self.up))):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class VectorQuantizer(nn.Module):
    """Nearest-codebook lookup (taming ``VectorQuantizer2``, inference only)."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)

    def forward(self, z):  # [B, D, H, W]
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        e = self.embedding.weight
        dist = (flat**2).sum(1, keepdim=True) + (e**2).sum(1)[None] - 2 * flat @ e.t()
        zq = e[torch.argmin(dist, dim=1)]
        return zq.reshape(b, h, w, d).permute(0, 3, 1, 2)


class FirstStageDecoder(nn.Module):
    """``decode(z)`` of the autoencoder: latent [B, embed_dim, h, w] -> image [B, out_ch, H, W]."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        if cfg.kind == "vq":
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = Decoder(cfg)

    def forward(self, z):
        if self.config.kind == "vq":
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))
