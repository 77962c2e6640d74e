"""One hook point on the two matmuls of every attention core (Q·Kᵀ and P·V), for observers and quantizers.

The exported graph has one ONNX ``MatMul`` of two activations per attention matmul, in the order the model
runs them (the layer table's rows of kind "attention"). While a hook is active in this thread, every such
matmul the model runs calls ``hook(a, b, matmul)`` with its two inputs and the torch matmul it would run, in
that same order, and takes what the hook returns as the product. That covers:

* ptqd's CompVis modules (``compvis_unet``: ``CrossAttention``, ADM ``AttentionBlock``), which multiply with
  :func:`bmm`;
* diffusers' attention, which calls ``F.scaled_dot_product_attention``: while a hook is active that call is
  computed as the ONNX exporter writes it (``symbolic_opset14.scaled_dot_product_attention``: q·√s and kᵀ·√s,
  MatMul, Softmax, MatMul), so the hook sees the tensors the graph's MatMuls read.

Without a hook both are what they were (``torch.bmm`` and the original SDPA), so the FP model, its export and
its speed are untouched. A hook is per thread: models used from several threads do not see each other's.
"""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import torch
import torch.nn.functional as F

_local = threading.local()
_ORIGINAL_SDPA = F.scaled_dot_product_attention


def active():
    """The hook of this thread, or None."""
    return getattr(_local, "hook", None)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm`` through the active hook (the attention matmuls of ptqd's CompVis modules)."""
    hook = active()
    return torch.bmm(a, b) if hook is None else hook(a, b, torch.bmm)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    hook = active()
    if hook is None:
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **kwargs)
    if attn_mask is not None or is_causal or dropout_p or kwargs.get("enable_gqa"):
        raise NotImplementedError("attention hooks cover scaled_dot_product_attention without masks, causality, "
                                  "dropout or grouped queries (what diffusers' UNets call)")
    r = float(sqrt_scale(query.shape[-1], scale))
    w = torch.softmax(hook(query * r, key.transpose(-2, -1) * r, torch.matmul), dim=-1)
    return hook(w, value, torch.matmul)


def sqrt_scale(head_dim: int, scale: float | None = None) -> np.float32:
    """√s as the exported graph computes it, in float32: s = 1/√d from the head width (``Cast(Shape)``, ``Sqrt``,
    ``Div``) unless given, then ``Sqrt(s)``. In float64 it can land one ulp away (d = 80: 0.33437017 against
    0.33437014), and a few q·√s values would then round to another grid step than the engine's."""
    s = np.float32(1.0) / np.sqrt(np.float32(head_dim)) if scale is None else np.float32(scale)
    return np.sqrt(np.float32(s))


@contextlib.contextmanager
def hooked(hook):
    """Route this thread's attention matmuls through ``hook(a, b, matmul) -> product`` while active (nestable)."""
    F.scaled_dot_product_attention = _sdpa  # idempotent; without a hook it calls the original
    prev = active()
    _local.hook = hook
    try:
        yield hook
    finally:
        _local.hook = prev
