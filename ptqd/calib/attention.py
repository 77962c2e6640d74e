"""Quantized attention matmuls (``ptqd calibrate --attention``): Q·Kᵀ and P·V on 8-bit inputs.

Each attention core has two matmuls of two activations (the layer table's rows of kind "attention", in graph
order, which is the order the model runs them: ``ptqd.models.attention``). Modes:

  float   both stay float (the default until measured otherwise: docs/speed-and-size.md)
  qk      Q·Kᵀ on 8-bit q and k; P·V float
  int8    both, P·V on 8-bit softmax probabilities and v

A quantized matmul's inputs are per-tensor asymmetric uint8 (the activation grid of every ptqd layer, ranges
chosen by the calibration's ``--method`` over the observed steps), whatever the precision: attention has no
weights, so the 4-bit precisions keep 8-bit attention as they keep 8-bit first and last layers. What the
engines and the fake-quant model compute (exactly: integer products summed without rounding, then one float32
multiply, as ONNX Runtime's MatMulIntegerToFloat and an integer GEMM do):

  y = float32(Σ_k (q_a − z_a)(q_b − z_b)) · float32(s_a·s_b)

BOPs (``calib.bops``) do not count attention matmuls in any precision, as in the PTQD paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptqd.calib.quant import EXACT_F32, ActQuant
from ptqd.errors import UserError

ATTENTION_MODES = ("float", "qk", "int8")


@dataclass(frozen=True)
class MatMulQuant:
    """One quantized attention matmul: its ONNX node, its place among the attention matmuls as the model runs
    them, and the quantizers of its two inputs."""

    name: str
    index: int
    a: ActQuant
    b: ActQuant
    shape: tuple = ()  # the first input's shape past the batch-and-heads axis (the layer table's, batch 1)

    def to_json(self) -> dict:
        return {"name": self.name, "index": self.index, "a": self.a.to_json(), "b": self.b.to_json(),
                "shape": list(self.shape)}

    @staticmethod
    def from_json(m: dict) -> "MatMulQuant":
        return MatMulQuant(m["name"], int(m["index"]), ActQuant(**m["a"]), ActQuant(**m["b"]),
                           tuple(int(d) for d in m.get("shape", ())))


def check_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise UserError(f"--attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    return mode


def attention_rows(rows: list[dict]) -> list[dict]:
    """The layer table's attention matmuls, in graph order, each with its ``index`` among them."""
    return [dict(r, index=i) for i, r in enumerate(r for r in rows if r["kind"] == "attention")]


def softmax_fed(onnx_path) -> set[str]:
    """Names of the MatMuls that read a Softmax's output (P·V), through layout ops (Transpose, Reshape, ...)."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {o: n for n in g.node for o in n.output}
    passthrough = {"Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Dropout"}

    def from_softmax(t: str) -> bool:
        for _ in range(8):
            n = producer.get(t)
            if n is None:
                return False
            if n.op_type == "Softmax":
                return True
            if n.op_type not in passthrough:
                return False
            t = n.input[0]
        return False

    return {n.name for n in g.node if n.op_type == "MatMul" and any(from_softmax(i) for i in n.input)}


def selected_matmuls(rows: list[dict], mode: str, onnx_path) -> list[dict]:
    """The attention rows ``mode`` quantizes (each with ``index``)."""
    check_mode(mode)
    if mode == "float":
        return []
    att = attention_rows(rows)
    if mode == "int8":
        return att
    pv = softmax_fed(onnx_path)
    return [r for r in att if r["name"] not in pv]


class Observer:
    """A ``ptqd.models.attention`` hook that records both inputs of every attention matmul of one forward into
    ``stats[(index, "a" | "b")][step]`` (``new_stats()``: ``observe.TensorStats``) and changes nothing.
    ``close()`` appends the forward's attention matmuls (the first input's shape past the batch-and-heads axis,
    per matmul) to ``seen``, for :func:`check_order`."""

    def __init__(self, stats: dict, step: int, rng, per_call: int, wanted: set[int], seen: list, new_stats):
        self.stats, self.step, self.rng, self.per_call, self.wanted = stats, step, rng, per_call, wanted
        self.new_stats, self.seen, self.i, self.shapes = new_stats, seen, 0, []

    def __call__(self, a, b, matmul):
        i = self.i
        self.i += 1
        self.shapes.append(tuple(int(d) for d in a.shape[1:]))
        if i in self.wanted:
            for side, x in (("a", a), ("b", b)):
                self.stats.setdefault((i, side), {}).setdefault(self.step, self.new_stats()).add(
                    x, self.rng, self.per_call)
        return matmul(a, b)

    def close(self) -> None:
        if not self.seen or self.seen[-1] != self.shapes:
            self.seen.append(self.shapes)


def check_order(seen: list, rows: list[dict]) -> None:
    """Every observed forward ran the graph's attention matmuls, in the graph's order: as many, and each with
    its row's input shape (past the batch-and-heads axis). Otherwise the hook's indices would address other
    matmuls than the graph's, and the engines would not compute what the fake-quant model does."""
    expected = [tuple(r["in_shape"][1:]) for r in attention_rows(rows)]
    for shapes in seen:
        if shapes == expected:
            continue
        if len(shapes) != len(expected):
            why = (f"the model ran {len(shapes)} attention matmuls in a forward where its exported graph has "
                   f"{len(expected)}")
        else:
            i = next(i for i, (a, b) in enumerate(zip(shapes, expected)) if a != b)
            why = f"attention matmul {i} read {list(shapes[i])} where the graph's reads {list(expected[i])}"
        raise UserError(f"--attention: {why}; this model's attention is not one ptqd can quantize "
                        "(calibrate with --attention float)")


def quantize_matmuls(picked: list[dict], stats: dict, choose, steps=None) -> list[MatMulQuant]:
    """The quantizers of ``picked`` attention rows from the observed ``stats`` (of these ``steps`` only: a
    timestep bucket). ``choose(stats_list, key)``: the calibration's range choice at 8 bits."""
    out = []
    for r in picked:
        qs = []
        for side in ("a", "b"):
            per_step = stats.get((r["index"], side))
            if not per_step:
                raise UserError(f"attention matmul {r['name']} never ran along the calibration trajectories")
            sel = [v for k, v in per_step.items() if steps is None or k in steps]
            qs.append(choose(sel, (r["name"], side, None if steps is None else tuple(steps))))
        out.append(MatMulQuant(r["name"], r["index"], qs[0], qs[1], tuple(int(d) for d in r["in_shape"][1:])))
    return out


def load(meta: dict) -> list[MatMulQuant]:
    """The quantized attention matmuls of a calib/<precision>.json (none in a calibration without them)."""
    return [MatMulQuant.from_json(m) for m in meta.get("attention", [])]


class FakeQuantHook:
    """A ``ptqd.models.attention`` hook for one forward: each quantized matmul's inputs on their grids, their
    integer product summed exactly (float32 while every partial sum stays below 2^24, else float64), then
    ``float32(acc)·float32(s_a·s_b)``."""

    def __init__(self, by_index: dict):
        self.by_index, self.i, self.done = by_index, 0, 0

    def __call__(self, a, b, matmul):
        q = self.by_index.get(self.i)
        self.i += 1
        if q is None:
            return matmul(a, b)
        if q.shape and tuple(a.shape[1:]) != q.shape:
            raise ModelMismatch(f"attention matmul {q.index} ({q.name}) read {list(a.shape[1:])} where the calibration's "
                                f"read {list(q.shape)}")
        self.done += 1
        ia, ib = _centered(a, q.a), _centered(b, q.b)
        if _bound(q.a) * _bound(q.b) * a.shape[-1] >= EXACT_F32 or a.device.type != "cpu":
            acc = matmul(ia.double(), ib.double()).float()
        else:
            acc = matmul(ia, ib)
        return acc * float(np.float32(q.a.scale) * np.float32(q.b.scale))


    def close(self) -> None:
        """After the forward: every quantized attention matmul ran (else the model's attention path is not the
        one calibrated, and the fake-quant model would silently miss quantizers the engines have)."""
        if self.done != len(self.by_index):
            raise ModelMismatch(f"the forward ran {self.done} of the {len(self.by_index)} quantized attention matmuls "
                                f"({self.i} attention matmuls in all)")


class ModelMismatch(UserError):
    """The model's attention path is not the one its calibration saw (count, order or shapes): recalibrate."""

    def __init__(self, why: str):
        super().__init__(f"{why}; the model's attention is not the one calibrated (a changed torch or diffusers "
                         "attention path?): recalibrate, or calibrate with --attention float")


def _centered(x, q: ActQuant):
    import torch

    s = torch.tensor(q.scale, dtype=torch.float32, device=x.device)
    return torch.clamp(torch.round(x / s) + q.zero_point, 0, q.qmax) - q.zero_point


def _bound(q: ActQuant) -> int:
    return max(q.zero_point, q.qmax - q.zero_point)


def hook_factory(quants: list[MatMulQuant]):
    """What ``EpsModel.attention_hook`` takes: a fresh :class:`FakeQuantHook` per forward (None without any)."""
    if not quants:
        return None
    by_index = {q.index: q for q in quants}
    return lambda: FakeQuantHook(by_index)
