"""An independent MAC count of a torch UNet: forward hooks on its convolutions and linear layers and a wrapper
around scaled-dot-product attention, on the ``meta`` device (shapes only: a 2.57 B-parameter SDXL UNet at
1024x1024 is counted in a second without memory for its weights). What the layer table
(:mod:`ptqd.exporter.layers`, read from the exported ONNX graph) must agree with."""

from __future__ import annotations

import contextlib
import math

import torch


@contextlib.contextmanager
def counting_attention(totals: dict):
    """Count Q·Kᵀ and P·V of every ``F.scaled_dot_product_attention`` call while active (diffusers' attention)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def counted(q, k, v, *args, **kwargs):
        # [..., L, d] x [..., S, d]: L·S·d for the scores, L·S·d_v for the weighted sum
        lead = 1
        for s in q.shape[:-2]:
            lead *= int(s)
        L, d, S, dv = int(q.shape[-2]), int(q.shape[-1]), int(k.shape[-2]), int(v.shape[-1])
        totals["attention"] += lead * L * S * (d + dv)
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def count_macs(module: torch.nn.Module, *args, **kwargs) -> dict[str, int]:
    """MACs of one forward ``module(*args, **kwargs)`` by kind: conv (every nn.Conv1d/2d), linear (nn.Linear),
    attention (scaled-dot-product attention's two matmuls). Run it on ``meta`` tensors for free."""
    totals = {"conv": 0, "linear": 0, "attention": 0}

    def conv_hook(m, inp, out):
        totals["conv"] += out.numel() * math.prod(m.weight.shape[1:])

    def linear_hook(m, inp, out):
        totals["linear"] += out.numel() * m.in_features

    hooks = []
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad(), counting_attention(totals):
            module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return totals
