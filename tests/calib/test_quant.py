"""Quantizer math: grids, range choice, GPTQ."""

import numpy as np
import pytest

from ptqd.calib.quant import act_params, choose_act_range, gptq, quantize_weight, weight_scales


def test_act_params_grid_and_zero():
    q = act_params(-1.0, 3.0, 8)
    assert q.qmax == 255 and 0 <= q.zero_point <= 255
    assert q.fake(np.array([0.0], np.float32))[0] == 0.0  # zero is exact
    lo, hi = q.range
    assert lo <= -1.0 + q.scale and hi >= 3.0 - q.scale
    x = np.linspace(-5, 5, 101).astype(np.float32)
    y = q.fake(x)
    assert y.min() >= lo - 1e-6 and y.max() <= hi + 1e-6
    assert len(np.unique(act_params(-1.0, 3.0, 4).fake(x))) <= 16


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_range_beats_minmax_on_heavy_tails(bits):
    rng = np.random.RandomState(0)
    x = np.concatenate([rng.standard_normal(20000), [40.0, -35.0]]).astype(np.float32)
    mm = choose_act_range(x, x.min(), x.max(), bits, "minmax")
    ms = choose_act_range(x, x.min(), x.max(), bits, "mse")
    err = lambda q: np.mean((q.fake(x) - x) ** 2)  # noqa: E731
    assert err(ms) < err(mm)
    pc = choose_act_range(x, x.min(), x.max(), bits, "percentile")
    assert pc.range[1] < mm.range[1]


def test_weight_quant_symmetric_per_channel():
    w = np.random.RandomState(1).standard_normal((6, 3, 3, 3)) * np.arange(1, 7)[:, None, None, None]
    s = weight_scales(w, 4, axis=0, method="minmax")
    q = quantize_weight(w, s, 4, axis=0)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7
    np.testing.assert_allclose(s, np.abs(w).reshape(6, -1).max(1) / 7, rtol=1e-6)
    s_mse = weight_scales(w, 4, axis=0, method="mse")
    e = lambda s: ((quantize_weight(w, s, 4, 0) * s[:, None, None, None] - w) ** 2).sum()  # noqa: E731
    assert e(s_mse) <= e(s)


def test_gptq_reduces_output_error_on_correlated_inputs():
    rng = np.random.RandomState(0)
    K, N = 32, 4000
    mix = rng.standard_normal((K, K))
    X = mix @ rng.standard_normal((K, N))  # correlated inputs: where GPTQ's compensation pays
    W = rng.standard_normal((16, K))
    H = X @ X.T / N
    s = weight_scales(W, 4, axis=0)
    near = quantize_weight(W, s, 4, axis=0) * s[:, None]
    g = gptq(W, H, s, 4) * s[:, None]
    err = lambda Wq: np.linalg.norm((W - Wq) @ X)  # noqa: E731
    assert err(g) < 0.9 * err(near)
    assert np.abs(gptq(W, H, s, 4)).max() <= 7
