"""The demo model: a small class-conditional LDM of the LDM-4 family, trained on real digits.

Data: the 1,797 handwritten 8x8 digits that ship inside scikit-learn, upscaled to 32x32
(bilinear) in [-1, 1]; a stratified, seeded split holds out ``HELD_OUT`` images for evaluation.

Model (shipped as a CompVis checkpoint + YAML, so it loads through the same path as LDM-4):
  first stage  AutoencoderKL, f = 4: 32x32x1 image <-> 3x8x8 latent (CompVis Decoder)
  UNet         CompVis UNetModel, spatial transformer with cross-attention on a class
               embedding (ClassEmbedder, 11 classes: 0-9 and null class 10 for CFG)
  schedule     CompVis "linear" (scaled_linear) 0.0015 -> 0.0195, T = 1000, like cin256-v2
Plus a digit classifier (``digit_classifier.onnx``): its penultimate features define the
Fréchet distance (FD) used for quality, and its predictions the class accuracy of samples.

``ptqd train-demo`` reproduces the shipped weights (seeded; about 20 minutes on 2 CPU cores).
"""

from __future__ import annotations

import copy
import json
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np

HELD_OUT = 360
IMAGE_SIZE = 32
NULL_CLASS = 10
DEMO_FILES = ("demo_ldm.safetensors", "demo_ldm.yaml", "digit_classifier.onnx", "training.json")

UNET_PARAMS = {
    "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
    "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 32, "use_spatial_transformer": True,
    "transformer_depth": 1, "context_dim": 64,
}
DDCONFIG = {"double_z": True, "z_channels": 3, "resolution": IMAGE_SIZE, "in_channels": 1, "out_ch": 1, "ch": 32,
            "ch_mult": [1, 2, 2], "num_res_blocks": 0, "attn_resolutions": [], "dropout": 0.0}


def demo_config(scale_factor: float = 1.0) -> dict:
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "image_size": 8, "channels": 3,
            "cond_stage_key": "class_label", "conditioning_key": "crossattn", "scale_factor": scale_factor,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET_PARAMS},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                   "params": {"embed_dim": 3, "ddconfig": DDCONFIG}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                  "params": {"n_classes": 11, "embed_dim": 64, "key": "class_label"}},
        }}}


def demo_dir() -> Path:
    return Path(str(resources.files("ptqd.models") / "demo_weights"))


def digits(seed: int = 0):
    """(train_images, train_labels, test_images, test_labels): float32 [N, 1, 32, 32] in [-1, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [1797, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    x = upscale(x) * 2.0 - 1.0
    rng = np.random.RandomState(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):  # stratified hold-out
        idx = np.flatnonzero(y == c)
        test[rng.choice(idx, HELD_OUT // 10, replace=False)] = True
    return x[~test], y[~test], x[test], y[test]


def upscale(x: np.ndarray) -> np.ndarray:
    """Bilinear 8x8 -> 32x32 (half-pixel centres), numpy only: [N, C, 8, 8] -> [N, C, 32, 32]."""
    n = x.shape[-1]
    pos = (np.arange(IMAGE_SIZE) + 0.5) * n / IMAGE_SIZE - 0.5
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 1)
    i1 = np.clip(i0 + 1, 0, n - 1)
    w = np.clip(pos - np.floor(pos), 0, 1).astype(np.float32)
    w[pos < 0] = 0.0
    rows = x[..., i0, :] * (1 - w)[:, None] + x[..., i1, :] * w[:, None]
    return (rows[..., i0] * (1 - w) + rows[..., i1] * w).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Training (torch). Nothing below runs at sampling time.
# ---------------------------------------------------------------------------------------------
def _encoder(torch):
    """CompVis-style Encoder (f = 4) producing mean and log-variance of the latent."""
    from torch import nn

    from ptqd.models.first_stage import ResnetBlock, vae_norm

    class Down(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

        def forward(self, x):
            return self.conv(nn.functional.pad(x, (0, 1, 0, 1)))

    class Encoder(nn.Module):
        def __init__(self, dd):
            super().__init__()
            ch, mult = dd["ch"], dd["ch_mult"]
            self.conv_in = nn.Conv2d(dd["in_channels"], ch, 3, padding=1)
            blocks, cin = [], ch
            for i, m in enumerate(mult):
                for _ in range(dd["num_res_blocks"]):
                    blocks.append(ResnetBlock(cin, ch * m))
                    cin = ch * m
                if i != len(mult) - 1:
                    blocks.append(Down(cin))
            self.down = nn.Sequential(*blocks)
            self.mid = nn.Module()
            self.mid.block_1 = ResnetBlock(cin, cin)
            self.norm_out = vae_norm(cin)
            self.conv_out = nn.Conv2d(cin, 2 * dd["z_channels"], 3, padding=1)

        def forward(self, x):
            h = self.mid.block_1(self.down(self.conv_in(x)))
            return self.conv_out(nn.functional.silu(self.norm_out(h)))

    return Encoder(dict(DDCONFIG, num_res_blocks=1))


def _classifier(torch):
    from torch import nn

    class DigitClassifier(nn.Module):
        """32x32x1 in [-1, 1] -> (logits [B, 10], features [B, 128])."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            f = self.body(x)
            return self.head(f), f

    return DigitClassifier()


def _shift(torch, x, g, max_shift=2):
    """Random integer translations (zero background = -1), a cheap augmentation for digits."""
    b = x.shape[0]
    pad = torch.nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=g)
    out = torch.stack([pad[i, :, dy[i]:dy[i] + x.shape[2], dx[i]:dx[i] + x.shape[3]] for i in range(b)])
    return out


def train_demo(out_dir: str | Path, seed: int = 0, ae_steps: int = 800, unet_steps: int = 5000,
               clf_steps: int = 800, batch: int = 64, ae_batch: int = 32, progress: bool | None = None) -> dict:
    """Train autoencoder, UNet and classifier; write the shipped files to ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ptqd.models.compvis import parse_config
    from ptqd.models.compvis_unet import UNetModel
    from ptqd.models.first_stage import FirstStageDecoder

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = digits(seed)
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    log: dict = {"seed": seed, "train_images": len(ytr), "held_out_images": len(yte), "torch": torch.__version__}
    t0 = time.time()

    def bar(n, desc):
        return tqdm(range(n), desc=desc, disable=(None if progress is None else not progress), mininterval=2)

    # 1. autoencoder (KL-regularized, as AutoencoderKL; weight 1e-6 keeps the latent near N(0, s²))
    ucfg, dcfg, *_ = parse_config(demo_config())
    enc, fs = _encoder(torch), FirstStageDecoder(dcfg)
    quant_conv = torch.nn.Conv2d(6, 6, 1)
    params = list(enc.parameters()) + list(fs.parameters()) + list(quant_conv.parameters())
    opt = torch.optim.Adam(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=ae_steps, pct_start=0.05)
    for step in bar(ae_steps, "autoencoder"):
        idx = torch.randint(0, len(X), (ae_batch,), generator=g)
        x = _shift(torch, X[idx], g)
        mean, logvar = quant_conv(enc(x)).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = fs(z)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = (rec - x).abs().mean() + ((rec - x) ** 2).mean() + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    enc.eval(), fs.eval()
    with torch.no_grad():
        lat_tr = quant_conv(enc(X)).chunk(2, dim=1)[0]
        lat_te = quant_conv(enc(torch.from_numpy(xte))).chunk(2, dim=1)[0]
        scale = float(1.0 / lat_tr.flatten().std())
        rec_te = fs(lat_te)
        log["ae_test_mse"] = float(((rec_te - torch.from_numpy(xte)) ** 2).mean())
    log["scale_factor"] = scale
    log["ae_seconds"] = round(time.time() - t0, 1)

    # 2. UNet: eps-prediction on scaled latents, class dropped to the null class 10 % of the time (CFG)
    from ptqd.facts import NoiseSchedule

    sched_np = NoiseSchedule("scaled_linear", 1000, 0.0015, 0.0195)
    abar = torch.from_numpy(sched_np.alphas_cumprod).float()
    unet = UNetModel(ucfg)
    table = torch.nn.Embedding(11, 64)
    ema = copy.deepcopy(unet).requires_grad_(False)
    ema_table = copy.deepcopy(table).requires_grad_(False)
    params = list(unet.parameters()) + list(table.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    lr_at = lambda s: min(1.0, (s + 1) / 500) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / unet_steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    Z = lat_tr * scale
    t1 = time.time()
    losses = []
    for step in bar(unet_steps, "unet"):
        idx = torch.randint(0, len(Z), (batch,), generator=g)
        z0, y = Z[idx], Y[idx].clone()
        y[torch.rand(batch, generator=g) < 0.1] = NULL_CLASS
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = abar[t][:, None, None, None]
        xt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = ((unet(xt, t.float(), context=table(y)[:, None]) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(list(ema.parameters()) + list(ema_table.parameters()), params):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
    log["unet_final_loss"] = float(np.mean(losses[-500:]))
    log["unet_seconds"] = round(time.time() - t1, 1)

    # 3. digit classifier (features for FD, predictions for class accuracy)
    clf = _classifier(torch)
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    t2 = time.time()
    for step in bar(clf_steps, "classifier"):
        idx = torch.randint(0, len(X), (batch,), generator=g)
        x = _shift(torch, X[idx], g) + 0.05 * torch.randn(X[idx].shape, generator=g)
        loss = torch.nn.functional.cross_entropy(clf(x)[0], Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        log["classifier_test_accuracy"] = float((clf(torch.from_numpy(xte))[0].argmax(1).numpy() == yte).mean())
        log["classifier_on_reconstructions"] = float((clf(rec_te)[0].argmax(1).numpy() == yte).mean())
    log["classifier_seconds"] = round(time.time() - t2, 1)

    # 4. write: CompVis layout (fp16 storage to keep the repo small; loaded as fp32)
    state = {f"model.diffusion_model.{k}": v for k, v in ema.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in fs.state_dict().items()})
    state.update({f"first_stage_model.encoder.{k}": v for k, v in enc.state_dict().items()})
    state.update({f"first_stage_model.quant_conv.{k}": v for k, v in quant_conv.state_dict().items()})
    state["cond_stage_model.embedding.weight"] = ema_table.weight
    state["alphas_cumprod"] = abar
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() and k != "alphas_cumprod" else v.dtype).contiguous()
             for k, v in state.items()}
    save_file(state, str(out / "demo_ldm.safetensors"))
    import yaml

    (out / "demo_ldm.yaml").write_text(yaml.safe_dump(demo_config(scale), sort_keys=False))
    with open(out / "digit_classifier.onnx", "wb") as f:
        _export_classifier(torch, clf, f)
    log["total_seconds"] = round(time.time() - t0, 1)
    (out / "training.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def _export_classifier(torch, clf, f):
    import io
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(clf, (torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE),), buf, input_names=["image"],
                          output_names=["logits", "features"], dynamic_axes={k: {0: "batch"} for k in
                                                                             ("image", "logits", "features")},
                          opset_version=18, dynamo=False)
    f.write(buf.getvalue())
