"""Calibration at real sizes: the fast torch twins agree with the numpy references, memory is bounded
by layer groups, the fake-quant model's float32 integer accumulation is exact, devices and presets."""

import numpy as np
import pytest
import torch

from ptqd.calib import rounding
from ptqd.calib.quant import gptq as gptq_reference
from ptqd.errors import UserError


def _correlated(K=48, N=3000, C=12, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.standard_normal((K, K)) @ rng.standard_normal((K, N))
    return rng.standard_normal((C, K)), X @ X.T / N, X


def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_damped_inverse():
    _, H, _ = _correlated()
    U, dead = rounding.inverse_hessian_factor(torch.from_numpy(H).float())
    Hd = H + 0.01 * np.mean(np.diag(H)) * np.eye(len(H))
    ref = np.linalg.cholesky(np.linalg.inv(Hd)).T  # the numpy reference's factor
    assert not dead.any()
    np.testing.assert_allclose(U.numpy(), ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())
    assert np.allclose(np.tril(U.numpy(), -1), 0)


@pytest.mark.parametrize("grid", [4, 7])
def test_torch_gptq_matches_the_numpy_reference(grid):
    W, H, X = _correlated()
    qmax = 2 ** (grid - 1) - 1
    s = rounding.weight_scales(torch.from_numpy(W).float(), qmax)
    got = rounding.gptq(torch.from_numpy(W).float(), torch.from_numpy(H).float(), s, qmax).numpy()
    ref = gptq_reference(W, H, s.numpy(), grid)
    assert np.mean(got == ref) > 0.97  # float32 vs float64: a few rounding ties go the other way
    err = lambda q: np.linalg.norm((W - q * s.numpy()[:, None]) @ X)  # noqa: E731
    assert abs(err(got) / err(ref) - 1) < 0.02
    assert np.abs(got).max() <= qmax


def test_round_layer_stacks_grids_and_never_loses_to_nearest():
    W, H, _ = _correlated(seed=1)
    out = rounding.round_layer(W, torch.from_numpy(H).float(), [4, 7], "mse", "gptq", torch.device("cpu"))
    assert set(out) == {4, 7}
    for g, (q, s, e) in out.items():
        assert q.dtype == np.int8 and np.abs(q).max() <= 2 ** (g - 1) - 1 and s.shape == (len(W),)
        assert e["gptq"] < e["nearest"]  # correlated inputs: GPTQ's compensation pays
        alone = rounding.round_layer(W, torch.from_numpy(H).float(), [g], "mse", "gptq", torch.device("cpu"))[g]
        np.testing.assert_array_equal(alone[0], q)  # stacking the grids changes nothing
    # layer error: tr(dW H dW^T) / tr(W H W^T), as the einsum definition
    w = torch.from_numpy(W).float()
    d = W - 0.9 * W
    ref = np.einsum("ij,jk,ik->", d, H, d) / np.einsum("ij,jk,ik->", W, H, W)
    assert rounding.layer_error(w, 0.9 * w, torch.from_numpy(H).float()) == pytest.approx(ref, rel=1e-4)


def test_patch_rows_are_the_im2col_columns_at_the_sampled_positions():
    from ptqd.calib.observe import patch_rows

    conv = torch.nn.Conv2d(5, 4, 3, padding=1, stride=2)
    x = torch.randn(3, 5, 9, 7)
    cols = torch.nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 45)
    rows = patch_rows(torch, conv, x, 10_000, torch.Generator().manual_seed(0))
    assert rows.shape == (len(cols), 45)  # never more rows than output positions
    few = patch_rows(torch, conv, x, 40, torch.Generator().manual_seed(1))
    assert few.shape == (40, 45)
    assert all(bool((cols == r).all(dim=1).any()) for r in few)  # each sampled row is an exact im2col column


def test_groups_by_memory_bound_the_hessians_held_at_once():
    from ptqd.calib.observe import groups_by_memory, hessian_bytes

    rows = [{"name": f"n{i}", "weight_shape": [8, k, 3, 3]} for i, k in enumerate([4, 8, 16, 2, 40, 1])]
    budget = hessian_bytes(rows[2]) + hessian_bytes(rows[3])
    groups = groups_by_memory(rows, budget)
    assert [r["name"] for g in groups for r in g] == [r["name"] for r in rows]  # order kept
    for g in groups:
        assert len(g) == 1 or sum(hessian_bytes(r) for r in g) <= budget
    assert [len(g) for g in groups if any(r["name"] == "n4" for r in g)] == [1]  # larger than the budget: alone


@pytest.mark.parametrize("qmax,weight_scale", [(255, 1), (255, 60), (15, 60)])
def test_fake_quant_integer_accumulation_is_exact_in_float32(qmax, weight_scale):
    """Partial sums past 2^24 are split into digits; the result equals float64 accumulation exactly."""
    from ptqd.calib.fakequant import digit_bits, int_accumulate

    rng = np.random.RandomState(0)
    w = rng.randint(-63, 64, (6, 300, 3, 3)).astype(np.float32)
    w *= weight_scale / max(weight_scale, 1)  # keep the grid; weight_scale only picks the cases below
    if weight_scale > 1:
        w = np.sign(w) * 63  # the worst case: every weight at the grid's edge
    qx = torch.from_numpy(rng.randint(0, qmax + 1, (2, 300, 6, 6)).astype(np.float32))
    z = qmax // 3
    rowsum = w.reshape(6, -1).astype(np.float64).sum(1).reshape(1, -1, 1, 1)
    bits = digit_bits(qmax, float(np.abs(w).reshape(6, -1).sum(1).max()))
    assert (bits > 0) == (qmax * np.abs(w).reshape(6, -1).sum(1).max() >= 2**24)

    def op(v, wt):
        return torch.nn.functional.conv2d(v, wt)

    got = int_accumulate(op, qx, z, qmax, torch.from_numpy(w), torch.from_numpy(rowsum), bits, pad=(1, 1, 1, 1))
    xp = torch.nn.functional.pad(qx.double(), (1, 1, 1, 1), value=float(z)) - z
    ref = torch.nn.functional.conv2d(xp, torch.from_numpy(w).double())
    assert torch.equal(got, ref)


def test_device_selection():
    from ptqd.calib.device import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_device_cuda_refused_in_one_line_without_a_gpu(capsys, tiny_cin_bundle):
    from ptqd.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert main(["calibrate", str(tiny_cin_bundle), "--device", "cuda"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0]


def test_presets_scale_with_model_size():
    from ptqd.budget import PRESETS, preset_for

    table = lambda gmac: {"layers": [{"macs": gmac * 1e9}]}  # noqa: E731
    assert preset_for("auto", table(0.02)).name == "auto (default)"  # the demo
    assert preset_for("auto", table(2.9)).name == "auto (quick)"  # the 47 M cin256-v2-family UNet
    assert preset_for("auto", table(104.2)).name == "auto (minimal)"  # cin256-v2
    assert preset_for("thorough") == PRESETS["thorough"]
    costs = [p.calib_samples * p.steps + p.correct_samples * p.steps for p in
             (PRESETS["minimal"], PRESETS["quick"], PRESETS["default"], PRESETS["thorough"])]
    assert costs == sorted(costs)
    with pytest.raises(UserError, match="--preset|--budget"):
        preset_for("huge")


def test_sampling_resumed_mid_trajectory_equals_the_full_run(tiny_cin_bundle):
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.runtime.pipeline import sample_latents
    from ptqd.runtime.sampler import SamplerConfig

    b = Bundle.open(tiny_cin_bundle)
    runner = api.open_engine(b, "fp32")
    table = np.load(b.path(api.CLASS_EMBEDDING))
    for eta in (0.0, 1.0):
        cfg = SamplerConfig(steps=6, eta=eta, guidance=3.0)
        states = []
        labels, idx = np.array([0, 1]), np.arange(2)
        full = sample_latents(runner, b.facts, table, labels, idx, 0, cfg,
                              observe=lambda i, t, x, c, e: states.append(x.copy()))
        for i in (0, 3, 5):
            again = sample_latents(runner, b.facts, table, labels, idx, 0, cfg, start=(i, states[i]))
            np.testing.assert_array_equal(again, full)


def test_nearest_rounding_runs_no_hessian_pass_and_reports_no_layer_error(tiny_cin_bundle, tmp_path, monkeypatch,
                                                                           capsys):
    import shutil

    from ptqd import api
    from ptqd.calib import observe

    d = tmp_path / "b"
    shutil.copytree(tiny_cin_bundle, d)

    def no_h(*_a, **_k):
        raise AssertionError("nearest rounding replayed the calls for H")

    monkeypatch.setattr(observe, "hessians", no_h)
    from ptqd.cli import main

    assert main(["calibrate", str(d), "--samples", "2", "--steps", "2", "--rounding", "nearest", "--preset", "quick"]) == 0
    out = capsys.readouterr().out
    assert "H + weights" not in out and ", weights " in out and "not measured (nearest rounding runs no H pass)" in out
    rec = api.calibrate(d, samples=2, steps=2, rounding="nearest", progress=False)
    assert all(r["mean_layer_rel_error"] == {} for r in rec["precisions"].values())
    with np.load(d / "calib" / "w4a8.npz") as z:
        near = {k: z[k] for k in z.files}
    monkeypatch.undo()
    rec = api.calibrate(d, samples=2, steps=2, rounding="gptq", progress=False)
    assert set(rec["precisions"]["w4a8"]["mean_layer_rel_error"]) == {"nearest", "gptq"}
    with np.load(d / "calib" / "w4a8.npz") as z:
        assert z.files == list(near)
        assert any(not np.array_equal(z[k], near[k]) for k in z.files)  # GPTQ moved some weights: H was used
