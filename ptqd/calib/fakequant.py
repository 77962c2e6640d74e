"""The fake-quant torch model: exactly each precision's numerics, in float32.

It is the reference the engines are checked against (and, later, the model PTQD's
corrections are fitted on). Each quantized Conv / Linear is replaced by a module that
fake-quantizes its input (and a conv's output) and uses the dequantized integer weights:

  q_x = clamp(round(x / s_x) + z_x, 0, 2^a − 1)                    (ONNX QuantizeLinear)
  conv:   acc = Σ (q_x − z_x)·q_w + q_b                              exact integer accumulation
          q_y = clamp(round(float32(acc) · M_c) + z_y, 0, 255),  M_c = float32(s_x·s_w[c]) / s_y
          y = s_y·(q_y − z_y)
  linear: y = float32(acc) · float32(s_x·s_w[c]) + b                 (no output requantization)

That is what ONNX Runtime's integer kernels compute (QLinearConv's per-channel float32
requantization multiplier, MatMulIntegerToFloat's scale-then-bias), so the reference is exact
for them, not just close: a float conv on dequantized values would land on the other side of
a rounding tie now and then, and a trained UNet carries such 1-LSB flips along. The last conv,
whose float output is ε, runs in float on dequantized values, as ONNX Runtime does for it.

Exact integer accumulation, fast: on the CPU the integer conv / matmul runs in float32, where a
sum of integers is exact while every partial sum stays below 2^24 whatever the summation order.
With S = max_c Σ_k |q_w[c, k]| a layer's partial sums are bounded by qmax_x · S; when that bound
can pass 2^24 the input integers are split into base-2^b digits (b chosen so that each digit's
products stay below 2^24), each digit is one float32 conv, and the digits are recombined in float64:
acc = Σ_i 2^(b·i) · conv(digit_i) − z_x · Σ_k q_w (convs pad with the zero point explicitly, as 0.0
is q = z_x). On CUDA, where cuDNN may pick Winograd or FFT algorithms that are not exact, the
integer conv runs in float64 instead.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptqd.calib.quant import EXACT_F32, ActQuant


def fake_quant(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    s = torch.tensor(q.scale, dtype=torch.float32, device=x.device)
    return (torch.clamp(torch.round(x / s) + q.zero_point, 0, q.qmax) - q.zero_point) * s


def _quant_uint(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """q_x in [0, qmax] as float32 integers."""
    s = torch.tensor(q.scale, dtype=torch.float32, device=x.device)
    return torch.clamp(torch.round(x / s) + q.zero_point, 0, q.qmax)




def digit_bits(qmax: int, abs_row_sum: float) -> int:
    """Bits per input digit so that each digit's partial sums stay below 2^24 (``qmax``: the input's
    largest integer; ``abs_row_sum``: max over output channels of Σ|q_w|). 0: no split is needed."""
    if qmax * abs_row_sum < EXACT_F32:
        return 0
    b = int(np.floor(np.log2(EXACT_F32 / max(abs_row_sum, 1.0) + 1)))
    if b < 1:
        raise ValueError(f"integer weights too large for exact float32 accumulation (Σ|q_w| = {abs_row_sum:g})")
    return b


def int_accumulate(op, qx: torch.Tensor, z: int, qmax: int, w_f32: torch.Tensor, w_rowsum: torch.Tensor,
                   bits: int, pad=None) -> torch.Tensor:
    """Σ_k (q_x − z)·q_w exactly, as float64: ``op(x, w)`` is the layer's conv or matmul (float32).

    ``pad``: (left, right, top, bottom) zero-point padding for convs (their own padding must be 0).
    ``bits`` from :func:`digit_bits`; float64 throughout off the CPU."""
    if qx.device.type != "cpu":
        x = qx.double()
        if pad is not None:
            x = F.pad(x, pad, value=float(z))
        return op(x - z, w_f32.double())
    if pad is not None:
        qx = F.pad(qx, pad, value=float(z))
    if bits == 0:
        return op(qx - z, w_f32).double()
    base, acc, rest = float(2**bits), None, qx
    for i in range(-(-int(qmax).bit_length() // bits)):  # digits of q_x, least significant first
        digit = torch.remainder(rest, base)
        part = op(digit, w_f32).double() * float(2 ** (bits * i))
        acc = part if acc is None else acc + part
        rest = (rest - digit) / base
    return acc - float(z) * w_rowsum


class FakeQuantConv(nn.Module):
    """Integer weights are kept as int8 (a quarter of the float model's memory) and widened per call."""

    def __init__(self, conv: nn.Module, lq):
        super().__init__()
        self.lq = lq
        self.is1d = isinstance(conv, nn.Conv1d)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        shape = (-1,) + (1,) * (lq.w_int.ndim - 1)
        w2d = lq.w_int.reshape(len(lq.w_int), -1)
        self.register_buffer("w_int", torch.from_numpy(np.ascontiguousarray(lq.w_int, np.int8)))
        bq = np.zeros(len(lq.w_scale), np.int32) if lq.bias_q is None else lq.bias_q
        if lq.act_out is None:  # the last conv: float conv on dequantized values
            self.register_buffer("w", torch.from_numpy(lq.w_int.astype(np.float32) * lq.w_scale.reshape(shape)))
            self.register_buffer("b", torch.from_numpy((bq.astype(np.float32) * lq.bias_scale).astype(np.float32)))
            return
        self.bits = digit_bits(lq.act_in.qmax, float(np.abs(w2d.astype(np.int64)).sum(1).max()))
        view = (1, -1) + (1,) * (lq.w_int.ndim - 2)
        self.register_buffer("w_rowsum", torch.from_numpy(w2d.astype(np.float64).sum(1).reshape(view)))
        self.register_buffer("b_int", torch.from_numpy(bq.astype(np.float64).reshape(view)))
        m = (np.float32(lq.act_in.scale) * lq.w_scale.astype(np.float32)).astype(np.float32) / np.float32(
            lq.act_out.scale)
        self.register_buffer("mult", torch.from_numpy(m.astype(np.float32).reshape(view)))

    def forward(self, x):
        lq = self.lq
        f = F.conv1d if self.is1d else F.conv2d
        if lq.act_out is None:  # float conv on dequantized values (ONNX Runtime's FusedConv)
            return f(fake_quant(x, lq.act_in), self.w, self.b, self.stride, self.padding, self.dilation, self.groups)
        pads = tuple(int(v) for p in reversed(self.padding) for v in (p, p))  # F.pad order: last dim first

        def op(v, w):
            return f(v, w, None, self.stride, 0, self.dilation, self.groups)

        acc = int_accumulate(op, _quant_uint(x, lq.act_in), lq.act_in.zero_point, lq.act_in.qmax,
                             self.w_int.float(), self.w_rowsum, self.bits, pad=pads)
        acc = acc + self.b_int
        out = lq.act_out
        q = torch.clamp(torch.round(acc.float() * self.mult) + out.zero_point, 0, out.qmax)
        return (q - out.zero_point) * torch.tensor(out.scale, dtype=torch.float32, device=x.device)


class FakeQuantLinear(nn.Module):
    def __init__(self, lin: nn.Linear, lq):
        super().__init__()
        self.lq = lq
        self.register_buffer("w_int", torch.from_numpy(np.ascontiguousarray(lq.w_int, np.int8)))
        self.bits = digit_bits(lq.act_in.qmax, float(np.abs(lq.w_int.astype(np.int64)).sum(1).max()))
        self.register_buffer("w_rowsum", torch.from_numpy(lq.w_int.astype(np.float64).sum(1)))
        self.register_buffer("mult", torch.from_numpy((np.float32(lq.act_in.scale) * lq.w_scale).astype(np.float32)))
        self.bias = lin.bias

    def forward(self, x):
        acc = int_accumulate(torch.matmul, _quant_uint(x, self.lq.act_in), self.lq.act_in.zero_point,
                             self.lq.act_in.qmax, self.w_int.float().T, self.w_rowsum, self.bits)
        y = acc.float() * self.mult
        return y + self.bias if self.bias is not None else y


def fake_quant_model(eps_model, layers, attention=()):
    """A copy of the EpsModel with every calibrated layer replaced by its fake-quant twin (on the CPU), and
    ``attention``'s quantized attention matmuls (``calib.attention.MatMulQuant``) fake-quantized in its forward.

    The replaced layers' float weights are not copied: the copy borrows them until their twins (which hold
    the integer weights) replace those layers. So making it costs the unquantized parameters and the integer
    weights, not a second float copy of the model (10.3 GB for SDXL's UNet); the source is left as it was."""
    memo = {}
    for lq in layers:
        w = eps_model.unet.get_submodule(lq.module).weight
        memo[id(w)] = w
    borrowed = set(memo)
    model = _with_twins(copy.deepcopy(eps_model, memo), layers)
    if any(id(p) in borrowed for p in model.parameters()):  # a borrowed weight another module shares: copy all
        model = _with_twins(copy.deepcopy(eps_model), layers)
    from ptqd.calib.attention import hook_factory

    model.attention_hook = hook_factory(list(attention))
    return model.cpu().eval()  # after the replacement: moving a borrowed weight would move the source's


def _with_twins(model, layers):
    for lq in layers:
        parent_name, _, leaf = lq.module.rpartition(".")
        parent = model.unet.get_submodule(parent_name) if parent_name else model.unet
        orig = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
        new = FakeQuantLinear(orig, lq) if isinstance(orig, nn.Linear) else FakeQuantConv(orig, lq)
        if leaf.isdigit():
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)
    return model
