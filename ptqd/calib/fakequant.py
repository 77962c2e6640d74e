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
a rounding tie now and then, and a trained UNet carries such 1-LSB flips along. The integer
accumulation runs in float64, exact for |acc| < 2^53. The last conv, whose float output is ε,
runs in float on dequantized values, as ONNX Runtime does for it.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ptqd.calib.quant import ActQuant


def fake_quant(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    s = torch.tensor(q.scale, dtype=torch.float32)
    return (torch.clamp(torch.round(x / s) + q.zero_point, 0, q.qmax) - q.zero_point) * s


def _quant_int(x: torch.Tensor, q: ActQuant) -> torch.Tensor:
    """q_x − z_x as float64 integers."""
    s = torch.tensor(q.scale, dtype=torch.float32)
    return (torch.clamp(torch.round(x / s) + q.zero_point, 0, q.qmax) - q.zero_point).double()


class FakeQuantConv(nn.Module):
    def __init__(self, conv: nn.Module, lq):
        super().__init__()
        self.conv, self.lq = conv, lq
        shape = (-1,) + (1,) * (lq.w_int.ndim - 1)
        self.register_buffer("w_int", torch.from_numpy(lq.w_int.astype(np.float64)))
        self.register_buffer("w", torch.from_numpy((lq.w_int.astype(np.float32) * lq.w_scale.reshape(shape))))
        bq = np.zeros(len(lq.w_scale), np.int32) if lq.bias_q is None else lq.bias_q
        self.register_buffer("b_int", torch.from_numpy(bq.astype(np.float64)))
        self.register_buffer("b", torch.from_numpy((bq.astype(np.float32) * lq.bias_scale).astype(np.float32)))
        if lq.act_out is not None:
            m = (np.float32(lq.act_in.scale) * lq.w_scale.astype(np.float32)).astype(np.float32) / np.float32(
                lq.act_out.scale)
            self.register_buffer("mult", torch.from_numpy(m.astype(np.float32)))

    def forward(self, x):
        c, lq = self.conv, self.lq
        f = F.conv1d if isinstance(c, nn.Conv1d) else F.conv2d
        view = (1, -1) + (1,) * (x.dim() - 2)
        if lq.act_out is None:  # float conv on dequantized values (ONNX Runtime's FusedConv)
            return f(fake_quant(x, lq.act_in), self.w, self.b, c.stride, c.padding, c.dilation, c.groups)
        acc = f(_quant_int(x, lq.act_in), self.w_int, None, c.stride, c.padding, c.dilation, c.groups)
        acc = acc + self.b_int.view(view)
        out = lq.act_out
        q = torch.clamp(torch.round(acc.float() * self.mult.view(view)) + out.zero_point, 0, out.qmax)
        return (q - out.zero_point) * torch.tensor(out.scale, dtype=torch.float32)


class FakeQuantLinear(nn.Module):
    def __init__(self, lin: nn.Linear, lq):
        super().__init__()
        self.lq = lq
        self.register_buffer("w_int_t", torch.from_numpy(lq.w_int.astype(np.float64).T.copy()))
        self.register_buffer("mult", torch.from_numpy((np.float32(lq.act_in.scale) * lq.w_scale).astype(np.float32)))
        self.bias = lin.bias

    def forward(self, x):
        acc = _quant_int(x, self.lq.act_in) @ self.w_int_t
        y = acc.float() * self.mult
        return y + self.bias if self.bias is not None else y


def fake_quant_model(eps_model, layers):
    """A copy of the EpsModel with every calibrated layer replaced by its fake-quant twin."""
    model = copy.deepcopy(eps_model)
    for lq in layers:
        parent_name, _, leaf = lq.module.rpartition(".")
        parent = model.unet.get_submodule(parent_name) if parent_name else model.unet
        orig = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
        new = FakeQuantLinear(orig, lq) if isinstance(orig, nn.Linear) else FakeQuantConv(orig, lq)
        if leaf.isdigit():
            parent[int(leaf)] = new
        else:
            setattr(parent, leaf, new)
    return model.eval()
