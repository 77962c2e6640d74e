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

    @classmethod
    def from_params(cls, target: str, params: dict) -> "DecoderConfig":
        dd = params.get("ddconfig") or {}
        if target.endswith(("VQModelInterface", "VQModel")):
            kind = "vq"
        elif target.endswith("AutoencoderKL"):
            kind = "kl"
        else:
            raise ModelLoadError(
                f"first_stage_config.target {target!r} is not supported; expected "
                "ldm.models.autoencoder.VQModelInterface or AutoencoderKL"
            )
        attn_type = dd.get("attn_type", "vanilla")
        if attn_type != "vanilla" or dd.get("use_linear_attn"):
            raise ModelLoadError(f"first-stage attention type {attn_type!r} is not supported (only 'vanilla')")
        try:
            return cls(
                ch=int(dd["ch"]), out_ch=int(dd["out_ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                num_res_blocks=int(dd["num_res_blocks"]),
                attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", ())),
                resolution=int(dd["resolution"]), z_channels=int(dd["z_channels"]),
                embed_dim=int(params["embed_dim"]), kind=kind,
                n_embed=int(params["n_embed"]) if kind == "vq" else None,
                tanh_out=bool(dd.get("tanh_out", False)),
            )
        except KeyError as e:
            raise ModelLoadError(f"first_stage_config is missing {e.args[0]!r}") from None

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
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
        self.norm = _norm(c)
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
        self.norm_out = _norm(block_in)
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
