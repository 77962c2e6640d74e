"""The activation formats of the W4A4 studies (benchmarks/w4a4_dynamic.py, w4a4_outliers.py --dynamic): the
numbers in docs/calibration.md rest on these emulations being the formats they name."""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from w4a4_dynamic import E2M1, e2m1, e4m3, fp4_blocks  # noqa: E402
from w4a4_outliers import dynamic_act_quant  # noqa: E402


def test_e2m1_levels_and_rounding():
    lv = torch.tensor(E2M1)
    assert torch.equal(e2m1(lv), lv) and torch.equal(e2m1(-lv), -lv)
    got = e2m1(torch.tensor([0.24, 0.26, 1.3, 2.49, 2.51, 4.9, 5.1, 7.0, 1e6, -3.6]))
    assert got.tolist() == [0.0, 0.5, 1.5, 2.0, 3.0, 4.0, 6.0, 6.0, 6.0, -4.0]
    # ties go to the even mantissa (0, 1, 2, 4), as IEEE-style round to nearest even
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0])
    assert e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, -4.0]


def test_e4m3_keeps_its_values_and_rounds_to_3_mantissa_bits():
    exact = torch.tensor([1.0, 1.125, 1.875, 448.0, 2.0 ** -6, 2.0 ** -9, 0.75, 240.0])
    assert torch.equal(e4m3(exact), exact)
    got = e4m3(torch.tensor([1.06, 1.07, 500.0, 3.3, 2.0 ** -8 * 1.4, 0.0, 2.0 ** -11]))
    # 2^-8·1.4 is 2.8 subnormal steps of 2^-9; below half a step is 0
    assert got.tolist() == [1.0, 1.125, 448.0, 3.25, 2.0 ** -9 * 3, 0.0, 0.0]


@pytest.mark.parametrize("fmt,size", [("nvfp4", 16), ("mxfp4", 32)])
def test_fp4_blocks_scale_each_block_on_its_own(fmt, size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3 * size, 5, generator=g)  # channels on axis 1
    x[:, size:2 * size] *= 100.0  # one block of channels far larger than the others
    y = fp4_blocks(x, 1, fmt)
    assert y.shape == x.shape
    small = fp4_blocks(x[:, :size], 1, fmt)
    if fmt == "mxfp4":  # power-of-two scales do not depend on the rest of the tensor
        assert torch.equal(y[:, :size], small)
    for b in range(3):
        blk, qb = x[:, b * size:(b + 1) * size], y[:, b * size:(b + 1) * size]
        for i in range(2):
            for j in range(5):
                v, q = blk[i, :, j], qb[i, :, j]
                levels = q.abs().unique()
                assert len(levels) <= len(E2M1)
                amax = float(v.abs().max())
                if fmt == "nvfp4":  # s = E4M3(amax / 6 / g)·g, g = the call's amax / (6·448), values s·E2M1
                    gl = float(x.abs().max()) / (6 * 448)
                    s = float(torch.tensor(amax / 6 / gl).to(torch.float8_e4m3fn).float()) * gl
                    k = q.abs() / s
                    assert torch.all(torch.isin((k * 2).round() / 2, torch.tensor(E2M1)))
                    assert torch.allclose(k, (k * 2).round() / 2, atol=1e-4)
                    assert abs(float(q.abs().max()) - amax) <= amax * 2 ** -4
                else:  # s = 2^(floor(log2 amax) - 2): values past 6·s saturate
                    s = 2.0 ** (torch.floor(torch.log2(torch.tensor(amax))) - 2)
                    assert torch.all(torch.isin(q.abs() / s, torch.tensor(E2M1)))
                    assert float(q.abs().max()) <= 6 * s
                assert float(((q - v) ** 2).mean()) < float((v ** 2).mean()) * 0.05


def test_dynamic_int4_groups():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 4, 4, generator=g)
    x[:, :, :2] = x[:, :, :2].relu()  # skewed groups with exact zeros
    x[:, 16:, 3] = x[:, 16:, 3].abs() + 0.5  # all-positive groups: 0 must still be inside the range
    x[0, :16, 0, 0] *= 50.0
    q = dynamic_act_quant(1, 16, 1.0)(x)
    for n in range(2):
        for grp in range(2):
            for h in range(4):
                for w in range(4):
                    v, qv = x[n, grp * 16:(grp + 1) * 16, h, w], q[n, grp * 16:(grp + 1) * 16, h, w]
                    assert len(qv.unique()) <= 16
                    step = (float(v.max().clamp_min(0)) - float(v.min().clamp_max(0))) / 15
                    assert float((qv - v).abs().max()) <= step / 2 + 1e-6  # min/max range: no clipping
    assert torch.equal(dynamic_act_quant(1, 16, 1.0)(torch.zeros(1, 16, 2, 2)), torch.zeros(1, 16, 2, 2))
    assert torch.all(q[x == 0] == 0)  # 0 is a level of every group: the zero point is a whole number
    step = x[:, 16:, 3].amax(1) / 15  # all-positive groups: the range is [0, max], the levels whole steps from 0
    assert torch.all((q[:, 16:, 3] / step.unsqueeze(1) - (q[:, 16:, 3] / step.unsqueeze(1)).round()).abs() < 1e-4)
    # one range per pixel over all channels: the large block of pixel (0, 0) coarsens its other block only
    whole = dynamic_act_quant(1, None, 1.0)(x)
    assert float((whole[0, 16:, 0, 0] - x[0, 16:, 0, 0]).abs().max()) > float(
        (q[0, 16:, 0, 0] - x[0, 16:, 0, 0]).abs().max())


def test_dynamic_int4_symmetric_groups():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 32, generator=g)  # a linear's input: channels last
    q = dynamic_act_quant(-1, 16, 1.0, symmetric=True)(x)
    xb, qb = x.reshape(3, 5, 2, 16), q.reshape(3, 5, 2, 16)
    s = xb.abs().amax(-1, keepdim=True) / 7
    k = qb / s
    assert torch.allclose(k, k.round(), atol=1e-4) and k.round().min() >= -8 and k.round().max() <= 7
    assert torch.allclose(qb.abs().amax(-1), xb.abs().amax(-1))  # the block's amax is a level
    assert float((qb - xb).abs().max()) <= float(s.max()) / 2 + 1e-6
