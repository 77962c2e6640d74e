"""Runtime side of PTQD: correction arithmetic, VSC, interpolation over t, plan switching."""

import numpy as np
import pytest

from ptqd.facts import NoiseSchedule
from ptqd.runtime.correction import CorrectionTable, Plan, StepCorrection, StepEngines
from ptqd.runtime.sampler import DDIMSampler

AC = NoiseSchedule("scaled_linear", 1000, 0.0015, 0.0195).alphas_cumprod


def sampler(steps=20):
    s = DDIMSampler(AC)
    s.set_timesteps(steps)
    return s


def test_correction_inverts_a_known_error():
    rng = np.random.RandomState(0)
    eps = rng.randn(4, 3, 8, 8).astype(np.float32)
    bias = np.array([0.1, -0.2, 0.05])
    eps_q = 1.25 * eps + bias.reshape(1, 3, 1, 1).astype(np.float32)
    c = StepCorrection(0.25, bias, 0.0)
    np.testing.assert_allclose(c.apply(eps_q), eps, atol=1e-6)
    assert c.residual_std() == 0.0 and StepCorrection(0.25, bias, 0.5).residual_std() == pytest.approx(0.4)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_vsc_variance_never_negative_and_bounded(eta):
    s = sampler()
    for t in s.timesteps:
        for r in (0.0, 0.01, 0.1, 1.0, 10.0):
            v = s.calibrated_sigma(int(t), eta, r)
            assert 0.0 <= v <= s.sigma(int(t), eta) + 1e-12


def test_vsc_removes_the_residual_variance():
    s = sampler()
    t = int(s.timesteps[10])
    sig, lam = s.sigma(t, 1.0), s.eps_coefficient(t, 1.0)
    r = 0.5 * sig / abs(lam)
    assert s.calibrated_sigma(t, 1.0, r) ** 2 == pytest.approx(sig**2 - lam**2 * r**2)
    # λ_t is ε's net coefficient in x_prev: perturbing ε by d moves x_prev by λ_t·d
    x = np.random.RandomState(1).randn(1, 3, 4, 4).astype(np.float32)
    e = np.zeros_like(x)
    a, _ = s.step(e, t, x, eta=1.0, noise=np.zeros_like(x))
    b, _ = s.step(e + 1.0, t, x, eta=1.0, noise=np.zeros_like(x))
    np.testing.assert_allclose(b - a, lam, rtol=1e-4)


def test_vsc_equals_plain_sampler_when_sigma_q_is_zero():
    rng = np.random.RandomState(2)
    s = sampler()
    x = rng.randn(2, 3, 8, 8).astype(np.float32)
    for t in s.timesteps:
        eps, z = rng.randn(*x.shape).astype(np.float32), rng.randn(*x.shape).astype(np.float32)
        plain, _ = s.step(eps, int(t), x, eta=1.0, noise=z)
        vsc, _ = s.step(eps, int(t), x, eta=1.0, noise=z, residual_std=0.0)
        np.testing.assert_array_equal(plain, vsc)


def test_vsc_direction_choice_only_matters_under_vsc():
    s = sampler()
    t = int(s.timesteps[5])
    x = np.ones((1, 3, 2, 2), np.float32)
    eps = np.full_like(x, 0.5)
    z = np.zeros_like(x)
    a, _ = s.step(eps, t, x, 1.0, z, residual_std=0.2, vsc_direction="sigma")
    b, _ = s.step(eps, t, x, 1.0, z, residual_std=0.2, vsc_direction="sigma_prime")
    assert not np.allclose(a, b)
    c, _ = s.step(eps, t, x, 1.0, z, residual_std=0.0, vsc_direction="sigma_prime")
    d, _ = s.step(eps, t, x, 1.0, z)
    np.testing.assert_array_equal(c, d)


def table():
    steps = [{"t": t, "k": k, "bias": [b, -b], "sigma_q": sq} for t, k, b, sq in
             [(1, 0.1, 0.0, 0.2), (501, 0.3, 0.2, 0.4), (951, 0.0, 0.4, 0.1)]]
    return CorrectionTable.from_json({"steps": steps[::-1]})


def test_coefficients_interpolate_linearly_in_t_and_hold_at_the_ends():
    tab = table()
    c = tab.at(501)
    assert (c.k, c.sigma_q) == (0.3, 0.4) and list(c.bias) == [0.2, -0.2]
    mid = tab.at(251)
    assert mid.k == pytest.approx(0.2) and mid.sigma_q == pytest.approx(0.3)
    np.testing.assert_allclose(mid.bias, [0.1, -0.1])
    assert tab.at(999).k == 0.0 and tab.at(0).k == 0.1  # held beyond the calibrated range


def test_plan_uses_nearest_calibrated_timestep_higher_precision_on_ties():
    pl = Plan.from_json({"precisions_by_cost": ["w4a4", "w8a8"],
                         "steps": [{"t": 101, "precision": "w4a4"}, {"t": 51, "precision": "w8a8"}]})
    assert pl.at(101) == "w4a4" and pl.at(51) == "w8a8" and pl.at(76) == "w8a8" and pl.at(90) == "w4a4"
    assert pl.precisions == ["w4a4", "w8a8"]


def test_step_engines_switch_without_reloading_and_count_switches():
    calls = []

    def runner(name):
        def f(x, t, c=None):
            calls.append(name)
            return x
        return f

    pl = Plan([951, 501, 1], ["w4a4", "w4a4", "w8a8"], {"w4a4": 0, "w8a8": 1})
    eng = StepEngines({"w4a4": runner("a"), "w8a8": runner("b")}, pl, {"w4a4": table()}, use=("k", "bias"))
    r1, c1 = eng.at(951)
    r2, c2 = eng.at(1)
    assert c1 is not None and c2 is None  # w8a8 has no table: uncorrected
    r1(0, 0), r2(0, 0)
    assert calls == ["a", "b"] and eng.switches == 1
    assert eng.residual_std(c1) == 0.0  # "vsc" not in use
    with pytest.raises(ValueError, match="plan needs engines"):
        StepEngines({"w4a4": runner("a")}, pl)
