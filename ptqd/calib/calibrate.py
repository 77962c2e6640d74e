"""Calibration: layer selection, activation ranges, weight rounding, per precision.

Layer selection (PTQD's defaults): every Conv and every linear MatMul is quantized, except
skip-connection 1x1 convs and downsample convs (stay FP) and the first and last layers (8 bits
whatever the precision). Time/label-embedding Gemms (a few kMAC) and the attention matmuls
(activation x activation) stay float, as in PTQD and TensorRT's recipes: quantizing softmax and
elementwise ops costs more than it saves on CPUs (MEASURED.md).

Numerics of a quantized layer (what the fake-quant model and the engines compute):
  input   per-tensor asymmetric, a bits (4-bit activations: uint8 storage clipped to [0, 15])
  weight  per-output-channel symmetric, w bits, int8 storage. With ``reduce_range`` (default),
          8-bit weights use the grid ±63: ONNX Runtime's u8×s8 kernels on x86 without VNNI add
          pairs of products in 16 bits, and 2·255·127 > 32767 saturates; with |q_w| ≤ 63 the
          integer kernels are exact (measured: engine == fake-quant model bit for bit)
  conv    bias int32 at scale s_x·s_w; output requantized to 8 bits (ONNX Runtime's QLinearConv
          needs a quantized output; the next layer's float ops then see that grid), except the
          last conv, whose output is ε: float output (a float conv on dequantized values)
  linear  integer accumulation, float output (MatMulIntegerToFloat), float bias
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ptqd.calib.quant import ActQuant, act_params, choose_act_range, gptq, quantize_weight, weight_scales
from ptqd.errors import UserError

PRECISIONS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a4": (4, 4)}
DEFAULT_KEEP_FP = (r"skip_connection$", r"\.op$", r"nin_shortcut$")


@dataclass(frozen=True)
class CalibConfig:
    samples: int = 32  # trajectories; labels cycle through the classes
    seeds: int = 1
    steps: int = 20
    eta: float = 0.0
    guidance: float = 3.0
    method: str = "mse"  # activation range: mse | minmax | percentile
    rounding: str = "gptq"  # weights: nearest | gptq
    buckets: int = 1
    reduce_range: bool = True  # 8-bit weights on ±63 (exact on AVX2 u8s8 kernels); 4-bit weights unaffected
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    precisions: tuple[str, ...] = tuple(PRECISIONS)

    def validate(self) -> None:
        if self.method not in ("mse", "minmax", "percentile"):
            raise UserError(f"--method must be mse, minmax or percentile, got {self.method!r}")
        if self.rounding not in ("nearest", "gptq"):
            raise UserError(f"--rounding must be nearest or gptq, got {self.rounding!r}")
        if self.samples < 1 or self.seeds < 1:
            raise UserError("--samples must be >= 1")
        if not 1 <= self.buckets <= self.steps:
            raise UserError(f"--buckets must be between 1 and --steps ({self.steps}), got {self.buckets}")
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise UserError(f"unknown precision(s) {bad}; ptqd calibrates {', '.join(PRECISIONS)}")


def select_layers(rows: list[dict], keep_fp=DEFAULT_KEEP_FP) -> list[dict]:
    """Rows to quantize, each with ``role``: "first", "last" (8 bits) or "body". Others stay FP.

    The last layer computes ε itself: its output is not requantized (no Q/DQ on the network output).
    """
    cands = [r for r in rows if r["kind"] in ("conv", "linear") and r["op"] in ("Conv", "MatMul") and r["module"]]
    convs = [r for r in cands if r["op"] == "Conv"]
    edge = {convs[0]["name"], convs[-1]["name"]} if convs else set()
    out = []
    for r in cands:
        if any(re.search(p, r["module"]) for p in keep_fp):
            continue
        role = "body" if r["name"] not in edge else ("last" if r["name"] == convs[-1]["name"] else "first")
        out.append(dict(r, role=role))
    return out


def _weight2d(mod) -> tuple[np.ndarray, np.ndarray | None]:
    w = mod.weight.detach().double().numpy()
    b = None if mod.bias is None else mod.bias.detach().double().numpy()
    return w.reshape(w.shape[0], -1), b


def layer_error(w2d: np.ndarray, deq2d: np.ndarray, H: np.ndarray) -> float:
    """Relative output error of a weight change on the observed inputs: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    d = w2d - deq2d
    return float(np.einsum("ij,jk,ik->", d, H, d) / max(np.einsum("ij,jk,ik->", w2d, H, w2d), 1e-30))


@dataclass
class LayerQuant:
    name: str
    module: str
    op: str
    w_bits: int
    a_bits: int
    act_in: ActQuant
    act_out: ActQuant | None
    w_int: np.ndarray  # torch layout [C_out, ...], int8
    w_scale: np.ndarray  # [C_out] float32
    bias_q: np.ndarray | None = None  # int32 [C_out] (convs)
    errors: dict = field(default_factory=dict)

    @property
    def bias_scale(self) -> np.ndarray:
        return (np.float32(self.act_in.scale) * self.w_scale).astype(np.float32)


def bucket_steps(steps: int, buckets: int) -> list[list[int]]:
    """Contiguous groups of sampler step indices (step 0 = the noisiest timestep)."""
    return [g.tolist() for g in np.array_split(np.arange(steps), buckets)]


def quantize_layers(loaded, selected: list[dict], obs: dict, cfg: CalibConfig, precision: str,
                    steps: list[int] | None = None, weights_from: list[LayerQuant] | None = None) -> list[LayerQuant]:
    """Quantize every selected layer. ``steps``: use activation statistics of these steps only (a
    timestep bucket). ``weights_from``: reuse those integer weights (buckets share weights)."""
    w_bits_p, a_bits_p = PRECISIONS[precision]
    prior = {lq.name: lq for lq in weights_from} if weights_from else {}
    unet = loaded.unet.unet
    out = []
    for r in selected:
        o = obs[r["name"]]
        wb, ab = (8, 8) if r["role"] in ("first", "last") else (w_bits_p, a_bits_p)
        ins = [v for k, v in o.inputs.items() if steps is None or k in steps]
        lo, hi = min(s.lo for s in ins), max(s.hi for s in ins)
        act_in = choose_act_range(np.concatenate([s.merged() for s in ins]), lo, hi, ab, cfg.method)
        act_out = None
        if r["op"] == "Conv" and r["role"] != "last":
            outs = [v for k, v in o.outputs.items() if steps is None or k in steps]
            act_out = choose_act_range(np.concatenate([s.merged() for s in outs]), min(s.lo for s in outs),
                                       max(s.hi for s in outs), 8, cfg.method)
        mod = unet.get_submodule(r["module"])
        w2d, b = _weight2d(mod)
        grid_bits = 7 if (cfg.reduce_range and wb == 8) else wb  # the weight grid actually used
        if r["name"] in prior:  # buckets differ in activation ranges only
            pq = prior[r["name"]]
            q, scales, errors = pq.w_int.reshape(len(w2d), -1), pq.w_scale, pq.errors
        else:
            q, scales, errors = _round_weights(w2d, o, cfg, grid_bits)
        lq = LayerQuant(r["name"], r["module"], r["op"], wb, ab, act_in, act_out,
                        q.reshape(mod.weight.shape).astype(np.int8), scales, errors=errors)
        if r["op"] == "Conv" and b is not None:
            lq.bias_q = np.round(b / lq.bias_scale.astype(np.float64)).astype(np.int32)
        out.append(lq)
    return out


def _round_weights(w2d: np.ndarray, o, cfg: CalibConfig, grid_bits: int):
    """(integer weights [C_out, K], scales, per-layer output error of nearest and GPTQ)."""
    scales = weight_scales(w2d, grid_bits, axis=0, method="mse" if cfg.method != "minmax" else "minmax")
    H = o.H / max(o.h_count, 1)
    q_near = quantize_weight(w2d, scales, grid_bits, axis=0)
    errors = {"nearest": layer_error(w2d, q_near * scales[:, None].astype(np.float64), H)}
    q = q_near
    if cfg.rounding == "gptq":
        q_g = gptq(w2d, H, scales, grid_bits)
        errors["gptq"] = layer_error(w2d, q_g * scales[:, None].astype(np.float64), H)
        q = q_g if errors["gptq"] <= errors["nearest"] else q_near  # never worse than nearest
    return q, scales, errors


def save_params(layers: list[LayerQuant]) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON meta, arrays) for the bundle's calib/<precision>.json + .npz."""
    meta, arrays = [], {}
    for i, lq in enumerate(layers):
        meta.append({"index": i, "name": lq.name, "module": lq.module, "op": lq.op, "w_bits": lq.w_bits,
                     "a_bits": lq.a_bits, "act_in": lq.act_in.to_json(),
                     "act_out": lq.act_out.to_json() if lq.act_out else None, "errors": lq.errors})
        arrays[f"{i}.w_int"] = lq.w_int
        arrays[f"{i}.w_scale"] = lq.w_scale
        if lq.bias_q is not None:
            arrays[f"{i}.bias_q"] = lq.bias_q
    return {"layers": meta}, arrays


def load_params(meta: dict, arrays) -> list[LayerQuant]:
    out = []
    for m in meta["layers"]:
        i = m["index"]
        out.append(LayerQuant(m["name"], m["module"], m["op"], m["w_bits"], m["a_bits"], ActQuant(**m["act_in"]),
                              ActQuant(**m["act_out"]) if m["act_out"] else None, arrays[f"{i}.w_int"],
                              arrays[f"{i}.w_scale"], arrays[f"{i}.bias_q"] if f"{i}.bias_q" in arrays else None,
                              m.get("errors", {})))
    return out


__all__ = ["CalibConfig", "PRECISIONS", "select_layers", "quantize_layers", "save_params", "load_params",
           "LayerQuant", "act_params"]
