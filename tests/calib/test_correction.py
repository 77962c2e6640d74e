"""PTQD's correction fit on synthetic errors with known k, bias and sigma; the plan criterion."""

import numpy as np
import pytest

from ptqd.calib.correction import assess, fit_precision, fit_step, make_plan


def synthetic(k, bias, sigma, n=256, shape=(3, 16, 16), seed=0):
    rng = np.random.RandomState(seed)
    eps = rng.randn(n, *shape)
    delta = k * eps + np.asarray(bias).reshape(1, -1, 1, 1) + sigma * rng.randn(n, *shape)
    return eps, delta


@pytest.mark.parametrize("k,bias,sigma", [(0.05, [0.02, -0.01, 0.03], 0.1), (0.2, [0.0, 0.1, -0.2], 0.5),
                                          (0.0, [0.01, 0.01, 0.01], 0.05)])
def test_fit_recovers_known_k_bias_sigma_within_1_percent(k, bias, sigma):
    eps, delta = synthetic(k, bias, sigma)
    f = fit_step(eps, delta)
    assert f.k == pytest.approx(k, abs=0.01 * max(k, sigma))
    assert f.sigma_q == pytest.approx(sigma, rel=0.01)
    # the bias is recovered to 1% of the noise level (its standard error is sigma/sqrt(N·H·W))
    np.testing.assert_allclose(f.bias, bias, atol=0.01 * sigma)


def test_negative_slope_becomes_zero_and_is_recorded():
    eps, delta = synthetic(-0.1, [0, 0, 0], 0.1)
    f = fit_step(eps, delta)
    assert f.k == 0.0 and f.k_raw == pytest.approx(-0.1, abs=0.002)


def test_correction_removes_the_correlated_part_on_held_out_samples():
    eps, delta = synthetic(0.2, [0.05, -0.05, 0.0], 0.1, n=128)
    rec = fit_precision([eps], [delta], [501], holdout=32)
    h = rec["steps"][0]["holdout"]
    assert h["explained_variance"] > 0.7  # 0.2²+bias² of ~0.1² noise
    # ε̂ − ε = Δ′/(1 + k): MSE = σ²/(1+k)²
    assert h["mse_corrected"] == pytest.approx(0.1**2 / 1.2**2, rel=0.03)
    assert rec["steps"][0]["gate"] == "k+bias"


def test_gate_drops_a_correction_that_does_not_help_held_out_samples():
    rng = np.random.RandomState(3)
    eps = rng.randn(64, 3, 8, 8)
    delta = 0.1 * rng.randn(64, 3, 8, 8)  # no k, no bias: whatever is fitted is noise
    rec = fit_precision([eps], [delta], [1], holdout=16)
    s = rec["steps"][0]
    assert s["holdout_gated"]["mse_corrected"] <= s["holdout"]["mse_uncorrected"] + 1e-15
    ungated = fit_precision([eps], [delta], [1], holdout=16, gate=False)["steps"][0]
    assert ungated["gate"] == "k+bias" and "holdout_gated" not in ungated


def test_assess_reports_uncorrected_error():
    eps, delta = synthetic(0.1, [0, 0, 0], 0.2, n=32)
    a = assess(fit_step(eps, delta), eps, delta)
    assert a["mse_uncorrected"] == pytest.approx(float((delta**2).mean()))
    assert a["snr_q"] > a["snr_q_uncorrected"]


def test_plan_picks_cheapest_precision_whose_snr_clears_the_sample_snr():
    ac = np.linspace(0.999, 0.01, 1000)  # ᾱ_t decreasing in t
    ts = [900, 500, 0]  # SNR_F: ~0.1, ~1, ~1000

    def rec(snrs):
        return {"steps": [{"t": t, "fit": {"snr_q": v}} for t, v in zip(ts, snrs)]}

    corr = {"w4a4": rec([5.0, 5.0, 5.0]), "w4a8": rec([50.0, 50.0, 50.0]), "w8a8": rec([100.0, 100.0, 100.0])}
    cost = {"w4a4": 1.0, "w4a8": 2.0, "w8a8": 4.0}
    plan = make_plan(corr, cost, ac, split="fit")
    assert [s["precision"] for s in plan["steps"]] == ["w4a4", "w4a4", "w8a8"]
    assert plan["steps"][2]["qualified"] is False  # none clears ~1000: the best SNR_Q is used
    assert plan["precisions_by_cost"] == ["w4a4", "w4a8", "w8a8"]
    snr_mid = plan["steps"][1]["snr_f"]
    plan2 = make_plan(corr, cost, ac, margin=6.0 / snr_mid, split="fit")
    assert plan2["steps"][1]["precision"] == "w4a8"


def test_budget_plan_downgrades_the_least_damaging_steps_first_and_respects_the_budget():
    from ptqd.calib.correction import budget_plan

    cost = {"w4a4": 1.0, "w4a8": 2.0, "w8a8": 4.0}
    damage = {"w4a4": [5.0, 0.1, 0.2, 3.0], "w8a8": [-0.5, 0.0, 0.0, -0.01]}
    plan = budget_plan(damage, cost, "w4a8", budget=0.75)  # mean cost <= 1.5: two steps must go to w4a4
    assert plan == ["w4a8", "w4a4", "w4a4", "w4a8"]
    # slack is spent on the upgrade that removes most error per BOP
    plan = budget_plan(damage, cost, "w4a8", budget=1.0)
    assert plan == ["w4a8"] * 4
    plan = budget_plan(damage, cost, "w4a8", budget=1.25)  # 2 BOPs of slack: step 0 to w8a8
    assert plan == ["w8a8", "w4a8", "w4a8", "w4a8"]
    assert sum(cost[p] for p in budget_plan(damage, cost, "w4a8", 0.6)) <= 0.6 * 2.0 * 4
    with pytest.raises(ValueError, match="no plan fits"):
        budget_plan(damage, cost, "w4a8", budget=0.1)
