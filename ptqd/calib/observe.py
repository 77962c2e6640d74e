"""Activation observers over the denoising steps.

The FP torch model runs along real sampler trajectories (classes x seeds, every step of the
configured schedule, classifier-free guidance doubling the batch as the sampler does). For
every quantized layer we record, per step, bounded statistics of its input (and, for convs,
of its output, which ONNX Runtime's QLinearConv requantizes):

  min, max     exact, streaming
  samples      a uniform random subsample (``per_call`` values per call): enough for the
               MSE and percentile range searches; memory is O(layers x steps x calls x per_call)
  H            Σ x xᵀ over (sub-sampled) input positions, for GPTQ and for reporting each
               layer's output error; conv inputs are unfolded to C_in·k_h·k_w rows

Observers only observe: they never change what the model computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TensorStats:
    lo: float = np.inf
    hi: float = -np.inf
    samples: list = field(default_factory=list)

    def add(self, x: np.ndarray, rng: np.random.RandomState, per_call: int) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        flat = x.reshape(-1)
        take = rng.choice(flat.size, min(per_call, flat.size), replace=False)
        self.samples.append(flat[take].astype(np.float32))

    def merged(self) -> np.ndarray:
        return np.concatenate(self.samples) if self.samples else np.zeros(0, np.float32)


@dataclass
class LayerObservation:
    name: str
    module: str
    kind: str  # "conv" | "linear"
    inputs: dict = field(default_factory=dict)  # step -> TensorStats
    outputs: dict = field(default_factory=dict)  # step -> TensorStats (convs)
    H: np.ndarray | None = None
    h_count: int = 0


def _columns(torch, mod, x, max_positions: int, gen):
    """Layer input as rows of the weight's contraction dim: [N, K]."""
    if isinstance(mod, torch.nn.Linear):
        cols = x.reshape(-1, x.shape[-1])
    else:
        if x.dim() == 3:  # conv1d -> treat as a 1-row image
            x = x.unsqueeze(2)
            ks, pad, st, dil = (1, mod.kernel_size[0]), (0, mod.padding[0]), (1, mod.stride[0]), (1, mod.dilation[0])
        else:
            ks, pad, st, dil = mod.kernel_size, mod.padding, mod.stride, mod.dilation
        cols = torch.nn.functional.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # [B, K, L]
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if cols.shape[0] > max_positions:
        idx = torch.randperm(cols.shape[0], generator=gen)[:max_positions]
        cols = cols[idx]
    return cols.float()


def observe(loaded, layers: list[dict], labels: np.ndarray, seeds: np.ndarray, cfg, per_call: int = 2048,
            h_positions: int = 512, progress=None, record_inputs: bool = True):
    """Run FP trajectories with hooks. Returns (observations by node name, calibration feeds).

    ``layers``: layer-table rows to observe (their ``module`` names address the torch modules).
    Calibration feeds are the UNet inputs of every step: list of (x, t, context) as the sampler
    sends them (batch doubled under guidance), kept for the ONNX Runtime ``quantize_static`` peer.
    """
    import torch

    from ptqd.runtime.pipeline import sample_latents
    from ptqd.runtime.sampler import DDIMSampler
    from ptqd.runtime.torch_runner import TorchRunner

    unet = loaded.unet.unet
    rng = np.random.RandomState(0)
    gen = torch.Generator().manual_seed(0)
    obs = {r["name"]: LayerObservation(r["name"], r["module"], r["kind"]) for r in layers}
    state = {"step": 0}
    handles = []

    def make_hooks(o: LayerObservation, mod):
        def pre(_m, args):
            x = args[0].detach()
            o.inputs.setdefault(state["step"], TensorStats()).add(x.numpy(), rng, per_call)
            cols = _columns(torch, mod, x, h_positions, gen)
            h = (cols.T @ cols).double().numpy()  # float32 products of <= h_positions rows, summed in float64
            o.H = h if o.H is None else o.H + h
            o.h_count += cols.shape[0]

        def post(_m, _args, y):
            o.outputs.setdefault(state["step"], TensorStats()).add(y.detach().numpy(), rng, per_call)

        handles.append(mod.register_forward_pre_hook(pre))
        if o.kind == "conv":
            handles.append(mod.register_forward_hook(post))

    for o in obs.values():
        make_hooks(o, unet.get_submodule(o.module))

    feeds: list[tuple] = []
    runner = TorchRunner(loaded.unet)
    sampler = DDIMSampler(loaded.facts.schedule.alphas_cumprod, cfg.spacing)
    sampler.set_timesteps(cfg.steps)
    step_of_t = {int(t): i for i, t in enumerate(sampler.timesteps)}

    def stepped(x, t, c=None):
        state["step"] = step_of_t[int(t[0])]
        if record_inputs:
            feeds.append((x.copy(), t.copy(), None if c is None else c.copy()))
        return runner(x, t, c)

    try:
        for s in seeds:
            sample_latents(stepped, loaded.facts, loaded.class_embedding, labels, np.arange(len(labels)), int(s), cfg)
            if progress is not None:
                progress.update(1)
    finally:
        for h in handles:
            h.remove()
    return obs, feeds
