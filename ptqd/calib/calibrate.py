"""Calibration: layer selection, activation ranges, weight rounding, per precision.

Layer selection: every Conv, every linear MatMul and every Gemm (time-embedding linears) is
quantized. The first and last layers, and the layers PTQD kept float for its base quantizer (skip
1x1 convs, downsample convs, embedding Gemms: ``W8_PATTERNS``, 6 % of cin256-v2's weights) are
quantized with 8-bit weights and activations whatever the precision (role "w8"): cheap in size,
and they keep the 4-bit engines' storage at 4-bit + 6 % x 8-bit. Exception: w8a8 keeps the skip
and downsample convs float (``FLOAT_IN_W8A8``: measured, their requantized outputs cost it 2.3 dB). The attention matmuls
(activation x activation) stay float by default; ``--attention qk|int8`` puts Q·Kᵀ (and P·V) on 8-bit inputs in
every precision (``calib/attention.py``). Softmax and elementwise ops stay float: quantizing them costs more
than it saves on CPUs (MEASURED.md). ``keep_fp`` patterns still keep layers float.

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

from ptqd.calib.quant import ActQuant, act_params, choose_act_range
from ptqd.errors import UserError
from ptqd.precision import CALIBRATED

PRECISIONS = {p.value: (p.w_bits, p.a_bits) for p in CALIBRATED}  # name -> (weight bits, activation bits)
PTQD_KEEP_FP = (r"skip_connection$", r"\.op$", r"nin_shortcut$")  # PTQD's float layers (now role "w8")
BRANCH_PATTERN = r"\.lowrank\.\d+$"  # the low-rank branches of ``--outliers`` (calib/outliers.py): 8-bit
W8_PATTERNS = PTQD_KEEP_FP + (r"time_embed\.\d+$", r"emb_layers\.\d+$", r"label_emb", BRANCH_PATTERN)
DEFAULT_KEEP_FP: tuple[str, ...] = ()
EIGHT_BIT_ROLES = ("first", "last", "w8")  # 8-bit weights and activations in every precision


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
    weights: str = "channel"  # weight scales: channel (per output channel) | tensor (one per layer)
    batch: int = 32  # trajectories observed at once (activation memory)
    reduce_range: bool = True  # 8-bit weights on ±63 (exact on AVX2 u8s8 kernels); 4-bit weights unaffected
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    attention: str = "float"  # attention matmuls: float | qk | int8 (calib/attention.py)

    def validate(self) -> None:
        if self.method not in ("mse", "minmax", "percentile"):
            raise UserError(f"--method must be mse, minmax or percentile, got {self.method!r}")
        if self.rounding not in ("nearest", "gptq"):
            raise UserError(f"--rounding must be nearest or gptq, got {self.rounding!r}")
        if self.weights not in ("channel", "tensor"):
            raise UserError(f"weight scales must be per channel or per tensor, got {self.weights!r}")
        if self.samples < 1 or self.seeds < 1 or self.batch < 1:
            raise UserError("--samples must be >= 1")
        if not 1 <= self.steps <= 1000:
            raise UserError(f"--steps must be between 1 and 1000, got {self.steps}")
        if not 1 <= self.buckets <= self.steps:
            raise UserError(f"--buckets must be between 1 and --steps ({self.steps}), got {self.buckets}")
        from ptqd.calib.attention import check_mode

        check_mode(self.attention)
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad:
            raise UserError(f"unknown precision(s) {bad}; ptqd calibrates {', '.join(PRECISIONS)}")


RECIPES = {
    # ptqd's own: MSE ranges, GPTQ, per-channel weights (the best measured; MEASURED.md)
    "default": {"method": "mse", "rounding": "gptq", "weights": "channel"},
    # close to the PTQD paper's base quantizer: per-tensor weights, nearest rounding, min-max ranges.
    # Its quantization error is correlated with eps, the condition PTQD's k_t correction relies on.
    "ptqd-paper": {"method": "minmax", "rounding": "nearest", "weights": "tensor"},
}


WEIGHT_GRIDS = ("portable", "full", "auto")


def reduce_range_for(grid: str) -> bool:
    """``--weight-grid``: portable = 8-bit weights on ±63 (exact on every x86 CPU's u8s8 kernels, the default),
    full = ±127 (one more bit; exact only where int8 products are summed in 32 bits: VNNI or AMX), auto = full
    on a CPU with VNNI or AMX, else portable. Engines built on the full grid record that they need VNNI and
    are refused on a CPU without it (``ptqd.stages.common.engine_requirements``)."""
    if grid not in WEIGHT_GRIDS:
        raise UserError(f"--weight-grid must be one of {', '.join(WEIGHT_GRIDS)}, got {grid!r}")
    if grid == "auto":
        from ptqd.resources import has_vnni

        return not has_vnni()
    return grid == "portable"


def recipe(name: str) -> dict:
    """The calibration options of a named recipe (--recipe); UserError for an unknown name."""
    if name not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return dict(RECIPES[name])


def select_layers(rows: list[dict], keep_fp=DEFAULT_KEEP_FP) -> list[dict]:
    """Rows to quantize, each with ``role``: "first", "last", "w8" (8 bits whatever the precision) or
    "body". Rows matching a ``keep_fp`` pattern stay FP.

    The last layer computes ε itself: its output is not requantized (no Q/DQ on the network output).
    """
    cands = [r for r in rows if r["kind"] in ("conv", "linear") and r["op"] in ("Conv", "MatMul", "Gemm")
             and r["module"]]
    convs = [r for r in cands if r["op"] == "Conv" and not re.search(BRANCH_PATTERN, r["module"])]
    edge = {convs[0]["name"], convs[-1]["name"]} if convs else set()
    out = []
    for r in cands:
        if any(re.search(p, r["module"]) for p in keep_fp):
            continue
        if r["name"] in edge:
            role = "last" if r["name"] == convs[-1]["name"] else "first"
        else:
            role = "w8" if r["op"] == "Gemm" or any(re.search(p, r["module"]) for p in W8_PATTERNS) else "body"
        row = dict(r, role=role)
        if r["op"] == "Conv" and r["module"].endswith(".lowrank.1"):
            row["float_out"] = True  # the branch's result joins the main output unrounded (calib/outliers.py)
        if any(re.search(p, r["module"]) for p in PTQD_KEEP_FP + (BRANCH_PATTERN,)):
            row["float_in"] = FLOAT_IN_W8A8
        out.append(row)
    return out


# Skip and downsample convs stay float in w8a8: their requantized 8-bit outputs join the residual stream,
# and quantizing them cost the demo's w8a8 2.3 dB paired PSNR (37.9 vs 40.3 dB, 500 samples). In the 4-bit
# precisions they are 8-bit layers among 4-bit ones, and float weights would break the 4-bit storage.
# ``--outliers``' low-rank branches too: on 8-bit kernels they add an 8-bit error about as large as w8a8's own
# (measured: the demo's w8a8 39.11 dB with them, 40.18 without the rewrite).
FLOAT_IN_W8A8 = ("w8a8",)


def quantized_in(selected: list[dict], precision: str) -> list[dict]:
    """The selected rows that ``precision`` quantizes (some stay float in some precisions: ``float_in``)."""
    return [r for r in selected if precision not in r.get("float_in", ())]


def with_inputs(selected: list[dict], onnx_path) -> list[dict]:
    """The selected rows with ``x``: the graph tensor each layer quantizes (its node's first input). Layers
    reading one tensor (a transformer block's q/k/v projections, every block's context k/v) then get one
    activation quantizer, and the QDQ writer one QuantizeLinear for all of them."""
    import onnx

    first_input = {n.name: n.input[0] for n in onnx.load(str(onnx_path), load_external_data=False).graph.node
                   if n.input}
    return [dict(r, x=first_input.get(r["name"], r["name"])) for r in selected]


def _weight2d(mod) -> tuple[np.ndarray, np.ndarray | None]:
    w = mod.weight.detach().float().cpu().numpy()
    b = None if mod.bias is None else mod.bias.detach().double().cpu().numpy()
    return w.reshape(w.shape[0], -1), b


def grid_bits(role: str, w_bits: int, reduce_range: bool) -> int:
    """The weight grid a layer really uses: first/last layers are 8-bit whatever the precision, and
    8-bit weights sit on ±63 (7 bits) with ``reduce_range``."""
    wb = 8 if role in EIGHT_BIT_ROLES else w_bits
    return 7 if (reduce_range and wb == 8) else wb


def quantize_weights(loaded, selected: list[dict], rec, cfg: CalibConfig, device, feeds_items: int = 4,
                     budget_bytes: int = 2 << 30, progress=None) -> dict:
    """Round every selected layer's weights on every grid the precisions need, in bounded memory.

    Layers go in groups (execution order) whose float32 H matrices fit ``budget_bytes``; for each
    group the recorded UNet calls are replayed to accumulate H (see ``observe.hessians``), the group's
    layers are rounded on each grid (the H is shared by all precisions), and the H are freed. Nearest
    rounding needs no H: it skips the replay (the most of this stage's time on large models: K² x rows
    flops per layer) and reports no layer error.
    Returns {(grid_bits, node name): (int weights [C_out, K] int8, scales [C_out], errors)}."""
    from ptqd.calib.observe import groups_by_memory, hessians
    from ptqd.calib.rounding import round_layer

    unet = loaded.unet.unet
    rank = {name: i for i, name in enumerate(rec.order)}
    ran = sorted((r for r in selected if r["name"] in rank), key=lambda r: rank[r["name"]])
    grids = {r["name"]: sorted({grid_bits(r["role"], PRECISIONS[p][0], cfg.reduce_range) for p in cfg.precisions})
             for r in selected}
    out = {}
    if cfg.rounding == "nearest":
        ran = []  # every layer below, without H
    for group in groups_by_memory(ran, budget_bytes):
        H = hessians(loaded, group, rec.feeds, device, items=feeds_items)
        for r in group:
            w2d, _ = _weight2d(unet.get_submodule(r["module"]))
            h = H.pop(r["name"], None)
            for gb, res in round_layer(w2d, h, grids[r["name"]], cfg.method, cfg.rounding, device,
                                         cfg.weights).items():
                out[(gb, r["name"])] = res
            del h
            if progress is not None:
                progress.update(1)
        del H
    done = {r["name"] for r in ran}
    for r in selected:  # no H (nearest rounding, or never ran along the trajectories): no error report
        if r["name"] not in done:
            w2d, _ = _weight2d(unet.get_submodule(r["module"]))
            for gb, res in round_layer(w2d, None, grids[r["name"]], cfg.method, "nearest", device,
                                         cfg.weights).items():
                out[(gb, r["name"])] = res
            if progress is not None:
                progress.update(1)
    return out


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


RANGE_SAMPLES = 65536  # values per range search (a seeded subset when more were observed)


def _act_range(stats: list, bits: int, method: str, cache: dict, key) -> ActQuant:
    """The activation quantizer of one tensor over some steps' statistics (cached: precisions with the
    same activation bits, and every precision's 8-bit conv outputs, share it)."""
    if key not in cache:
        samples = np.concatenate([s.merged() for s in stats])
        if samples.size > RANGE_SAMPLES:
            samples = samples[np.random.RandomState(0).choice(samples.size, RANGE_SAMPLES, replace=False)]
        cache[key] = choose_act_range(samples, min(s.lo for s in stats), max(s.hi for s in stats), bits, method)
    return cache[key]


def quantize_layers(loaded, selected: list[dict], obs: dict, cfg: CalibConfig, precision: str, weights: dict,
                    steps: list[int] | None = None, range_cache: dict | None = None) -> list[LayerQuant]:
    """Every selected layer of one precision: activation ranges from ``obs`` (of these ``steps`` only: a
    timestep bucket) and the rounded ``weights`` from :func:`quantize_weights` (buckets share weights).

    A conv's int32 bias must fit its grid s_x·s_w[c]: a channel whose weights are (nearly) all zero has a
    tiny s_w, and its bias would overflow int32 in ONNX Runtime's QLinearConv; such a channel's weight
    scale is raised until the bias fits (its integer weights are re-rounded on the larger scale)."""
    w_bits_p, a_bits_p = PRECISIONS[precision]
    unet = loaded.unet.unet
    cache = {} if range_cache is None else range_cache
    sk = None if steps is None else tuple(steps)
    out = []
    for r in quantized_in(selected, precision):
        o = obs[r["name"]]
        wb, ab = (8, 8) if r["role"] in EIGHT_BIT_ROLES else (w_bits_p, a_bits_p)
        ins = [v for k, v in o.inputs.items() if steps is None or k in steps]
        if not ins:
            raise UserError(f"layer {r['module']} never ran along the calibration trajectories; it cannot be "
                            "calibrated (keep it in float with a keep-fp pattern)")
        act_in = _act_range(ins, ab, cfg.method, cache, (r.get("x", r["name"]), "in", ab, sk))  # per tensor
        act_out = None
        if r["op"] == "Conv" and r["role"] != "last" and not r.get("float_out"):
            outs = [v for k, v in o.outputs.items() if steps is None or k in steps]
            act_out = _act_range(outs, 8, cfg.method, cache, (r["name"], "out", 8, sk))
        mod = unet.get_submodule(r["module"])
        gb = grid_bits(r["role"], w_bits_p, cfg.reduce_range)
        q, scales, errors = weights[(gb, r["name"])]
        b = None if mod.bias is None else mod.bias.detach().double().cpu().numpy()
        bias_q = None
        if r["op"] == "Conv" and b is not None:
            s_x = np.float64(np.float32(act_in.scale))
            need = np.abs(b) / (s_x * (2**31 - 1) / 2)  # keep |bias_q| <= 2^30: headroom for the accumulation
            low = scales.astype(np.float64) < need
            if low.any():
                scales = scales.copy()
                scales[low] = need[low].astype(np.float32) * np.float32(1.01)
                w2d = mod.weight.detach().float().cpu().numpy().reshape(len(scales), -1)
                qmax = 2 ** (gb - 1) - 1
                q = q.copy()
                q[low] = np.clip(np.round(w2d[low] / scales[low, None]), -qmax, qmax).astype(np.int8)
            bias_q = np.round(b / (np.float32(act_in.scale) * scales).astype(np.float64)).astype(np.int32)
        lq = LayerQuant(r["name"], r["module"], r["op"], wb, ab, act_in, act_out,
                        q.reshape(mod.weight.shape).astype(np.int8), scales, bias_q=bias_q, errors=errors)
        out.append(lq)
    return out


def quantize_attention(picked: list[dict], rec, cfg: CalibConfig, steps: list[int] | None = None,
                       range_cache: dict | None = None) -> list:
    """The quantized attention matmuls (``calib.attention.MatMulQuant``) of ``picked`` rows: 8-bit input ranges
    by ``cfg.method`` from ``rec.attention`` (of these ``steps`` only: a timestep bucket); the same in every
    precision (the cache is shared)."""
    from ptqd.calib.attention import quantize_matmuls

    cache = {} if range_cache is None else range_cache
    return quantize_matmuls(picked, rec.attention,
                            lambda stats, key: _act_range(stats, 8, cfg.method, cache, ("attention",) + key), steps)


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


__all__ = ["CalibConfig", "PRECISIONS", "EIGHT_BIT_ROLES", "select_layers", "quantized_in", "with_inputs",
           "quantize_layers", "quantize_attention", "save_params", "load_params", "LayerQuant", "act_params"]
