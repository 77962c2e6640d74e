"""Outliers out of the 4-bit path: smoothing and a low-rank branch, as an FP-equivalent rewrite of the UNet.

A body layer y = W·x (the layers that take the precision's bits; first/last and the 8-bit roles are left
alone) becomes, at the same module path,

    x' = x · s⁻¹                       smoothing (SmoothQuant): per input channel, s_c = a_c^α / w_c^(1−α),
                                       a_c = max |x_c| over the calibration calls, w_c = max |W[:, c]|
    y  = main(x') + B(A(x'))           main: W·s − B·A (quantized as any layer: 4-bit, GPTQ on this residual)
                                       A: k×k conv (or linear) to r channels, B: 1×1 conv (linear) back

so the quantized path sees an activation whose channels are balanced (x') and a weight whose largest
singular directions are gone (SVDQuant, Li et al., ICLR 2025, without its fused kernels). The branch reads
x' before the 4-bit activation quantizer, on its own 8-bit one, so it also carries what the 4-bit grid loses
along those directions. The branch runs on 8-bit kernels in the 4-bit precisions (role "w8" in
``calib.calibrate``; B's output joins the main output unrounded), so BOPs count it at 8 x 8 bits there and its
weights take a byte each; w8a8 runs it in float (on 8-bit kernels it would add about w8a8's own error again).

α is searched per layer (the identity is a candidate) on sampled input rows against the output error of the
w4a4 numerics (per-tensor asymmetric 4-bit input, per-channel 4-bit weights, the branch as its 8-bit kernels
compute it), among the candidates that do not raise the error under w8a8's numerics (float branch): one graph
serves every precision. The rank is the largest whose branch costs at most ``rank_budget`` of the layer's MACs.

The rewrite happens before export, so everything after it (layer table, calibration, GPTQ, the fake-quant
model, the QDQ graphs of every backend) sees ordinary layers; the Mul by s⁻¹ stays float. ``s⁻¹`` and the
branch weights are kept in the bundle (``outliers.npz``); ``main``'s weight is recomputed from the source's W by
:func:`main_weight` in float64 elementwise ops, the same float32 bits on every CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

MODES = ("none", "smooth", "lowrank", "svd")
ALPHAS = (0.25, 0.4, 0.5, 0.6, 0.75)


def check_mode(mode: str, rank_budget: float, layer_share: float = 1.0) -> None:
    from ptqd.errors import UserError

    if mode not in MODES:
        raise UserError(f"--outliers must be one of {', '.join(MODES)}, got {mode!r}")
    if not 0.0 < rank_budget <= 0.5:
        raise UserError(f"--rank-budget is the low-rank branch's share of a layer's MACs, in (0, 0.5]; got {rank_budget}")
    if not 0.0 < layer_share <= 1.0:
        raise UserError(f"--outlier-layers is the share of the 4-bit layers that get the rewrite, in (0, 1]; "
                        f"got {layer_share}")


def gain(rw: "LayerRewrite") -> float:
    """How much the rewrite lowers its layer's relative w4a4 output error."""
    return rw.errors["before"] - rw.errors["after"]


def select(rewrites: list["LayerRewrite"], body_layers: int, layer_share: float) -> list["LayerRewrite"]:
    """The rewrites of the ``layer_share`` of ``body_layers`` where they lower the layer error most, in their
    order. Each rewrite costs about the same time on CPU engines whatever its rank (a Mul, a second quantizer,
    two small convs and an Add: per-op overhead, not MACs, at these sizes), and the error it removes is
    concentrated (demo: the 4 GEGLU output linears hold 44 % of the summed reduction), so a share of the
    layers keeps most of it."""
    keep = min(len(rewrites), int(np.ceil(layer_share * body_layers - 1e-9)))
    chosen = {id(rw) for rw in sorted(rewrites, key=gain, reverse=True)[:keep]}
    return [rw for rw in rewrites if id(rw) in chosen]


@dataclass
class LayerRewrite:
    module: str
    alpha: float | None  # None: no smoothing
    rank: int
    errors: dict  # relative output error of the w4a4 numerics: {"before": e, "after": e}
    inv_s: np.ndarray | None  # [C_in] float32
    a: np.ndarray | None  # [r, C_in, (k, k)] float32
    b: np.ndarray | None  # [C_out, r, (1, 1)] float32

    def meta(self) -> dict:
        return {"module": self.module, "alpha": self.alpha, "rank": self.rank, "errors": self.errors}


def rank_for(c_out: int, k: int, budget: float) -> int:
    """The largest r with r·(K + C_out) ≤ budget·C_out·K (branch MACs per output position vs the layer's)."""
    return int(np.floor(budget * c_out * k / (k + c_out)))


def main_weight(w: np.ndarray, inv_s, a, b) -> np.ndarray:
    """W·s − B·A in float64 elementwise ops (deterministic on every CPU), as float32; W [C_out, C_in, ...]."""
    out = w.astype(np.float64)
    if inv_s is not None:
        s = 1.0 / inv_s.astype(np.float64)
        out = out * s.reshape((1, -1) + (1,) * (w.ndim - 2))
    if a is not None:
        a64, b64 = a.astype(np.float64), b.reshape(b.shape[0], b.shape[1]).astype(np.float64)
        for j in range(a.shape[0]):  # one outer product per rank: no BLAS summation order
            out = out - b64[:, j].reshape((-1,) + (1,) * (w.ndim - 1)) * a64[j][None]
    return out.astype(np.float32)


def _module_class():
    import torch
    from torch import nn

    class Rewritten(nn.Module):
        """main(x·s⁻¹) + B(A(x·s⁻¹)); ``inv_s``/``lowrank`` absent where that part is off."""

        def __init__(self, main, inv_s, lowrank):
            super().__init__()
            self.main = main
            self.smooth = inv_s is not None
            if self.smooth:
                shape = (1, -1) + (1,) * (main.weight.ndim - 2) if isinstance(main, nn.Conv2d) else (-1,)
                self.register_buffer("inv_s", torch.from_numpy(inv_s.astype(np.float32)).reshape(shape))
            self.lowrank = lowrank

        def forward(self, x):
            if self.smooth:
                x = x * self.inv_s
            y = self.main(x)
            return y if self.lowrank is None else y + self.lowrank(x)

    return Rewritten


def _branch(main, a: np.ndarray, b: np.ndarray):
    import torch
    from torch import nn

    r = a.shape[0]
    if isinstance(main, nn.Conv2d):
        first = nn.Conv2d(main.in_channels, r, main.kernel_size, main.stride, main.padding, main.dilation, bias=False)
        second = nn.Conv2d(r, main.out_channels, 1, bias=False)
    else:
        first, second = nn.Linear(main.in_features, r, bias=False), nn.Linear(r, main.out_features, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(a.reshape(first.weight.shape)))
        second.weight.copy_(torch.from_numpy(b.reshape(second.weight.shape)))
    return nn.Sequential(first, second).to(main.weight.device)


def apply(loaded, rewrites: list[LayerRewrite]) -> None:
    """Rewrite ``loaded``'s UNet in place (each listed module becomes main + branch at the same path)."""
    import torch

    Rewritten = _module_class()
    unet = loaded.unet.unet
    for rw in rewrites:
        parent_name, _, leaf = rw.module.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        layer = unet.get_submodule(rw.module)
        w = layer.weight.detach().cpu().numpy()
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(main_weight(w, rw.inv_s, rw.a, rw.b)))
        new = Rewritten(layer, rw.inv_s, None if rw.a is None else _branch(layer, rw.a, rw.b))
        if leaf.isdigit():
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)


def save(rewrites: list[LayerRewrite]) -> tuple[dict, dict[str, np.ndarray]]:
    meta, arrays = [], {}
    for i, rw in enumerate(rewrites):
        meta.append(rw.meta())
        for key in ("inv_s", "a", "b"):
            if getattr(rw, key) is not None:
                arrays[f"{i}.{key}"] = getattr(rw, key)
    return {"layers": meta}, arrays


def load(meta: dict, arrays) -> list[LayerRewrite]:
    return [LayerRewrite(m["module"], m["alpha"], m["rank"], m.get("errors", {}),
                         *(arrays[f"{i}.{k}"] if f"{i}.{k}" in arrays else None for k in ("inv_s", "a", "b")))
            for i, m in enumerate(meta["layers"])]


# ---- fitting ------------------------------------------------------------------------------------------------

def body_layers(loaded, feed) -> list[tuple[str, object]]:
    """(module path, module) of the layers a 4-bit precision quantizes at 4 bits, in execution order: every
    Conv2d (groups 1) and every Linear on a sequence (a MatMul in the graph), less the first and last conv and
    the 8-bit roles (``calib.calibrate.W8_PATTERNS``). One forward on ``feed`` finds the order and shapes."""
    import torch
    from torch import nn

    from ptqd.calib.calibrate import W8_PATTERNS
    from ptqd.engines.torch_ref import TorchRunner

    unet = loaded.unet.unet
    seen: list[tuple[str, object, int]] = []
    handles = []
    for name, mod in unet.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def pre(m, args, name=name):
                if all(n != name for n, _, _ in seen):
                    seen.append((name, m, args[0].dim()))
            handles.append(mod.register_forward_pre_hook(pre))
    try:
        x, t, c = feed
        with torch.no_grad():
            TorchRunner(loaded.unet, "cpu")(x[:1], t[:1], None if c is None else c[:1])
    finally:
        for h in handles:
            h.remove()
    convs = [n for n, m, _ in seen if isinstance(m, nn.Conv2d)]
    edge = {convs[0], convs[-1]} if convs else set()
    out = []
    for name, mod, ndim in seen:
        if name in edge or any(re.search(p, name) for p in W8_PATTERNS):
            continue
        if isinstance(mod, nn.Conv2d) and (mod.groups != 1 or isinstance(mod.padding, str)):
            continue
        if isinstance(mod, nn.Linear) and ndim < 3:  # a Gemm (time embedding): an 8-bit role
            continue
        out.append((name, mod))
    return out


def _quant_act(x, bits: int):
    """Fake-quantized x (torch) on a per-tensor asymmetric grid: the MSE range search's (on a subsample) below 8
    bits, min/max at 8 (where clipping matters little and the search would cost the fit most of its time)."""
    from ptqd.calib.fakequant import fake_quant
    from ptqd.calib.quant import choose_act_range

    flat = x.reshape(-1).numpy()
    sub = flat[np.random.RandomState(0).randint(0, flat.size, 16384)]
    q = choose_act_range(sub, float(flat.min()), float(flat.max()), bits, "mse" if bits < 8 else "minmax")
    return fake_quant(x, q)


def _quant_weight(w, bits: int):
    from ptqd.calib.rounding import quantize_nearest, weight_scales

    qmax = 2 ** (bits - 1) - 1
    s = weight_scales(w, qmax, "mse")
    return quantize_nearest(w, s, qmax) * s[:, None]


def _svd(w, r: int):
    """(A [r, K], B [C_out, r]) with B·A the best rank-r approximation of w, √σ on each side."""
    import torch

    if min(w.shape) > max(256, 4 * (r + 10)):  # large: randomized (Halko et al.), seeded, the same on every run
        with torch.random.fork_rng():
            torch.manual_seed(0)
            u, sv, v = torch.svd_lowrank(w.double(), q=r + 10, niter=4)
        vh = v.T
    else:
        u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = sv[:r].sqrt()
    a = (root[:, None] * vh[:r]).float()
    b = (u[:, :r] * root[None]).float()
    return a, b


def fit_layer(name: str, mod, X, amax, mode: str, rank_budget: float, bits: int = 4,
              guard: tuple[int, int] = (7, 8)) -> LayerRewrite:
    """Choose α (and the branch) for one layer from its sampled input rows X [N, K] (im2col order: C_in-major)
    and the per-channel max |x| ``amax`` [C_in], minimizing the ``bits``-bit output error
    ‖X Wᵀ − (Q(X') Q(R)ᵀ + Q₈(Q₈(X') Q₇(A)ᵀ) Q₇(B)ᵀ)‖² / ‖X Wᵀ‖² (the branch on 8-bit kernels) among the
    candidates that do not raise the error on the ``guard`` grid (weight bits, activation bits: w8a8's 7-bit
    portable weights by default): the rewrite serves every precision of the bundle, and a smoothing that helps
    4 bits can cost 8."""
    import torch

    w = mod.weight.detach().float().cpu().reshape(mod.weight.shape[0], -1)
    c_out, k = w.shape
    c_in = mod.weight.shape[1]
    taps = k // c_in
    y = X @ w.T
    norm = float((y ** 2).sum()) or 1.0
    r = rank_for(c_out, k, rank_budget) if mode in ("lowrank", "svd") else 0
    wmax = w.abs().reshape(c_out, c_in, taps).amax(dim=(0, 2)).clamp_min(1e-8)
    a_c = torch.as_tensor(amax, dtype=torch.float32).clamp_min(1e-5)

    def error(xp, resid, a, b, wb, ab):
        yhat = _quant_act(xp, ab) @ _quant_weight(resid, wb).T
        if a is not None and ab < 8:  # the branch as the 4-bit engines run it: 8-bit inputs, 7-bit weights
            mid = _quant_act(_quant_act(xp, 8) @ _quant_weight(a, 7).T, 8)
            yhat = yhat + mid @ _quant_weight(b, 7).T
        elif a is not None:  # w8a8 runs it in float (calib.calibrate.FLOAT_IN_W8A8)
            yhat = yhat + (xp @ a.T) @ b.T
        return float(((y - yhat) ** 2).sum()) / norm

    before = error(X, w, None, None, bits, bits)
    before_guard = error(X, w, None, None, *guard)
    best = (before, None, None, None, None, before_guard)
    for alpha in (None,) + (ALPHAS if mode in ("smooth", "svd") else ()):
        if alpha is None and r == 0:
            continue  # the layer as it is: ``best`` already
        if alpha is None:
            s = torch.ones(c_in)
        else:
            s = a_c ** alpha / wmax ** (1 - alpha)
            s = s / torch.exp(torch.log(s).mean())
        inv_s = (1.0 / s).float()
        s_k = (1.0 / inv_s.double()).float().repeat_interleave(taps)
        wp, xp = w * s_k[None], X * inv_s.repeat_interleave(taps)[None]
        a = b = None
        resid = wp
        if r > 0:
            a, b = _svd(wp, r)
            resid = wp - b @ a
        err = error(xp, resid, a, b, bits, bits)
        if err < best[0]:
            err_guard = error(xp, resid, a, b, *guard)
            if err_guard <= before_guard:
                best = (err, alpha, inv_s, a, b, err_guard)
    err, alpha, inv_s, a, b, err_guard = best
    shape_a = (r, c_in) + tuple(mod.weight.shape[2:])
    errors = {"before": before, "after": err, f"w{guard[0]}a{guard[1]}_before": before_guard,
              f"w{guard[0]}a{guard[1]}_after": err_guard}
    return LayerRewrite(name, alpha, 0 if a is None else r, errors, None if alpha is None else inv_s.numpy(),
                        None if a is None else a.numpy().reshape(shape_a),
                        None if b is None else b.numpy().reshape((c_out, r) + (1,) * (mod.weight.ndim - 2)))


def sample_inputs(loaded, layers, feeds, rows: int = 4096, items: int = 4, seed: int = 0) -> dict:
    """{module: (X [≤ rows, K] sampled input rows, per-channel max |x| [C_in])} over the recorded calls."""
    import torch
    from torch import nn

    from ptqd.calib.observe import GroupDone, patch_rows, replay

    positions = max(1, -(-rows // max(len(feeds), 1)))
    gen = torch.Generator().manual_seed(seed)
    acc: dict = {}
    handles = []
    last = layers[-1][0]
    for name, mod in layers:
        def pre(m, args, name=name):
            x = args[0].detach()
            cols = patch_rows(torch, m, x, positions, gen).cpu()
            dims = tuple(i for i in range(x.dim()) if i != (1 if isinstance(m, nn.Conv2d) else x.dim() - 1))
            amax = x.abs().amax(dim=dims).float().cpu()
            slot = acc.setdefault(name, [[], amax])
            slot[0].append(cols)
            slot[1] = torch.maximum(slot[1], amax)
            if name == last:
                raise GroupDone  # the rest of the UNet is not needed for this group
        handles.append(mod.register_forward_pre_hook(pre))
    replay(loaded, feeds, "cpu", items, handles)
    return {name: (torch.cat(cols)[:rows], amax) for name, (cols, amax) in acc.items()}


def fit(loaded, mode: str, rank_budget: float = 0.05, samples: int = 8, steps: int = 20, guidance: float = 3.0,
        budget_bytes: int = 2 << 30, status=None, layer_share: float = 1.0) -> list[LayerRewrite]:
    """Fit the rewrite of every body layer on ``samples`` FP trajectories of ``steps`` DDIM steps (CPU), layers in
    groups whose sampled input rows fit ``budget_bytes``, and keep those of the ``layer_share`` of the body
    layers where it helps most (:func:`select`). ``status(text)`` hears where it is."""
    from ptqd.calib.observe import record_trajectories
    from ptqd.runtime.loader import default_labels, sampler_config

    say = status or (lambda _m: None)
    labels = default_labels(loaded.facts, None, samples)
    scfg = sampler_config(loaded.facts, steps, 0.0, guidance)
    say(f"{mode} rewrite: {samples} FP trajectories of {steps} steps")
    feeds = record_trajectories(loaded, [], labels, np.arange(1), scfg, "cpu", batch=samples).feeds
    layers = body_layers(loaded, feeds[0])
    out, group, size, done = [], [], 0, [0]
    rows = 4096

    def run(group):
        got = sample_inputs(loaded, group, feeds, rows=rows)
        for name, mod in group:
            X, amax = got.pop(name)
            rw = fit_layer(name, mod, X, amax.numpy(), mode, rank_budget)
            if rw.alpha is not None or rw.rank:  # else the layer stays as it is
                out.append(rw)
            done[0] += 1
            say(f"{mode} rewrite: layer {done[0]}/{len(layers)}")

    for name, mod in layers:
        nb = 4 * rows * int(np.prod(mod.weight.shape[1:]))
        if group and size + nb > budget_bytes:
            run(group)
            group, size = [], 0
        group.append((name, mod))
        size += nb
    if group:
        run(group)
    return select(out, len(layers), layer_share)
