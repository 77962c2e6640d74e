"""Issue 14: the conditional correction fit, the end-to-end gate, the paper-like recipe."""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from ptqd.calib.correction import conditional_error, fit_conditional, fit_conditional_step
from ptqd.calib.gate import ResumedError, gate, gate_engine, step_ranges
from ptqd.facts import NoiseSchedule
from ptqd.runtime.correction import CorrectionTable, Plan, StepCorrection, StepEngines


def test_conditional_fit_recovers_a_known_affine_relation():
    rng = np.random.RandomState(0)
    a, b, sigma = np.array([-0.2, 0.1, 0.05]), np.array([0.03, -0.02, 0.0]), 0.1
    q = rng.randn(128, 3, 8, 8)  # eps_q, what the runtime sees
    delta = a.reshape(1, 3, 1, 1) * q + b.reshape(1, 3, 1, 1) + sigma * rng.randn(*q.shape)
    eps = q - delta
    f = fit_conditional_step(eps, delta)
    np.testing.assert_allclose(f["a"], a, atol=0.01)
    np.testing.assert_allclose(f["b"], b, atol=0.01)
    assert f["sigma_q"] == pytest.approx(sigma, rel=0.03)
    # the corrected error is the noise alone, and the held-out assessment sees it
    r = conditional_error(f, eps, delta)
    assert float(r.std()) == pytest.approx(sigma, rel=0.03)
    rec = fit_conditional([eps], [delta], [951], holdout=32)
    h = rec["steps"][0]["holdout"]
    assert h["mse_corrected"] < 0.5 * h["mse_uncorrected"] and h["mse_corrected"] == pytest.approx(sigma**2, rel=0.1)


def test_runtime_applies_the_conditional_correction_and_its_residual():
    rng = np.random.RandomState(1)
    a, b = np.array([-0.2, 0.1]), np.array([0.05, -0.1])
    eps = rng.randn(2, 2, 4, 4).astype(np.float32)
    # eps_q with Δ = a·eps_q + b exactly: eps_q = (eps + b) / (1 - a)
    eps_q = ((eps + b.reshape(1, 2, 1, 1)) / (1 - a.reshape(1, 2, 1, 1))).astype(np.float32)
    c = StepCorrection(0.0, np.zeros(2), 0.3, a, b, 0.07)
    np.testing.assert_allclose(c.apply(eps_q, use_cond=True), eps, atol=1e-5)
    assert c.residual_std(use_cond=True) == 0.07 and c.residual_std() == 0.3


def _record(k=0.1, bias=(0.1, 0.2)):
    steps = [{"t": t, "k": 0.0, "bias": [0.0, 0.0], "sigma_q": 0.2,
              "raw": {"k": k, "k_raw": k, "bias": list(bias), "sigma_q": 0.2}} for t in (1, 501)]
    cond = {"steps": [{"t": t, "a": [0.1, 0.1], "b": [0.0, 0.0], "sigma_q": 0.05} for t in (1, 501)]}
    return {"steps": steps, "conditional": cond,
            "gate": {"steps": [{"t": 501, "parts": ["bias"]}, {"t": 1, "parts": []}]}}


def test_table_reads_the_raw_fit_and_the_gates_parts():
    raw = CorrectionTable.from_json(_record())
    assert raw.parts is None and raw.k.tolist() == [0.1, 0.1] and raw.a is not None
    applied = CorrectionTable.from_json(_record(), applied=True)
    assert applied.at(501).parts == ("bias",) and applied.at(1).parts == ()
    eng = StepEngines({"q": lambda *a: None}, Plan.fixed("q"), {"q": applied}, use=("k", "bias", "vsc", "cond"))
    x = np.ones((1, 2, 2, 2), np.float32)
    _, c501 = eng.at(501)
    np.testing.assert_allclose(eng.correct(x, c501)[0, 1], 0.8)  # bias only: no k, no cond, no VSC
    assert eng.residual_std(c501) == 0.0
    _, c1 = eng.at(1)
    np.testing.assert_array_equal(eng.correct(x, c1), x)
    # no gate record: --correction auto applies nothing
    rec = _record()
    del rec["gate"]
    assert CorrectionTable.from_json(rec, applied=True).at(501).parts == ()


def test_gate_keeps_a_part_that_helps_and_drops_one_that_hurts():
    rng = np.random.RandomState(0)
    base = rng.rand(200) + 1.0
    noise = {eta: 0.01 * rng.randn(200) for eta in (0.0, 1.0)}

    def error(cfg, eta):
        e = base + noise[eta]
        for i, parts in enumerate(cfg):
            if "bias" in parts and i < 5:
                e = e - 0.05  # helps in the early range only
            if "bias" in parts and i >= 5:
                e = e + 0.02
            if "k" in parts:
                e = e + 0.03  # hurts everywhere
            if "vsc" in parts and eta > 0:
                e = e + 0.01
        return e

    rec = gate(error, 10, step_ranges(10, 2), candidates=(("k",), ("bias",), ("k", "bias")))
    assert rec["parts"] == [("bias",)] * 5 + [()] * 5
    assert rec["final"]["helps"] and rec["ranges"][1]["kept"] == [] and not any(v["helps"] for v in rec["vsc"])


def test_gate_applies_nothing_when_no_part_clearly_helps():
    rng = np.random.RandomState(1)

    def error(cfg, eta):  # pure noise: no part changes the expected error
        return 1.0 + 0.1 * rng.randn(64)

    rec = gate(error, 6, step_ranges(6, 3))
    assert rec["parts"] == [()] * 6


def test_resumed_error_reuses_the_latents_at_range_starts():
    calls = []

    def sample(cfg, eta, start, observe):
        x = np.zeros(3) if start is None else start[1]
        calls.append(0 if start is None else start[0])
        for i in range(0 if start is None else start[0], len(cfg)):
            observe(i, x)
            x = x + (2.0 if "bias" in cfg[i] else 1.0)
        return x[:, None]

    fn = ResumedError(sample, lambda eta: np.full((3, 1), 4.0), keep=[0, 2])
    off = ((),) * 4
    assert fn(off, 0.0).tolist() == [0.0, 0.0, 0.0]
    on_late = ((), (), ("bias",), ())
    assert fn(on_late, 0.0).tolist() == [1.0, 1.0, 1.0] and calls[-1] == 2  # resumed at step 2
    assert fn.steps_run == 4 + 2


def _facts():
    sched = NoiseSchedule("scaled_linear", 1000, 0.0015, 0.0195)
    return SimpleNamespace(schedule=sched, latent_shape=(2, 4, 4), conditioning=SimpleNamespace(kind="none"))


def test_gate_engine_on_synthetic_runners_keeps_bias_and_drops_a_wrong_k():
    from ptqd.runtime.sampler import SamplerConfig

    def fp(x, t, ctx):
        return (0.5 * x).astype(np.float32)

    off = np.array([0.3, -0.2], np.float32).reshape(1, 2, 1, 1)

    def quant(x, t, ctx):  # FP plus a constant per-channel offset: bias removes it exactly, k only distorts
        return (0.5 * x + off).astype(np.float32)

    steps = [{"t": t, "k": 0.5, "k_raw": 0.5, "bias": off.reshape(-1).tolist(), "sigma_q": 0.0}
             for t in (1, 251, 501, 751)]
    table = CorrectionTable.from_json({"steps": steps})
    cfg = SamplerConfig(steps=4, guidance=1.0)
    rec = gate_engine(quant, fp, table, _facts(), None, np.zeros(16, int), 101, cfg, ranges=2, batch=8)
    parts = [s["parts"] for s in rec["steps"]]
    assert all(p == ["bias"] for p in parts), parts
    assert table.parts is None  # the table is left as it was


def test_paper_recipe_gives_per_tensor_weight_scales():
    torch = pytest.importorskip("torch")
    from ptqd.calib.calibrate import CalibConfig, recipe
    from ptqd.calib.rounding import round_layer
    from ptqd.errors import UserError

    w = np.random.RandomState(0).randn(6, 20).astype(np.float32) * np.arange(1, 7)[:, None]
    r = recipe("ptqd-paper")
    assert r == {"method": "minmax", "rounding": "nearest", "weights": "tensor"}
    _, s, _ = round_layer(w, None, [4], r["method"], r["rounding"], torch.device("cpu"), r["weights"])[4]
    assert np.all(s == s[0]) and s[0] == pytest.approx(np.abs(w).max() / 7)
    _, sc, _ = round_layer(w, None, [4], "minmax", "nearest", torch.device("cpu"))[4]
    assert len(set(sc.tolist())) == 6  # the default stays per channel
    with pytest.raises(UserError, match="--recipe"):
        recipe("bogus")
    with pytest.raises(UserError, match="per tensor"):
        CalibConfig(weights="layer").validate()


def test_runtime_correction_stays_torch_free():
    code = ("import sys; import ptqd.runtime.correction, ptqd.runtime.sampler, ptqd.runtime.pipeline, "
            "ptqd.calib.gate, ptqd.calib.correction; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_plan_check_says_whether_the_corrected_plan_beats_the_uncorrected_one():
    from ptqd.calib.gate import gate_plan
    from ptqd.runtime.sampler import SamplerConfig

    def fp(x, t, ctx):
        return (0.5 * x).astype(np.float32)

    def close(x, t, ctx):
        return (0.5 * x + 0.01).astype(np.float32)

    def far(x, t, ctx):
        return (0.5 * x + 0.2).astype(np.float32)

    cfg = SamplerConfig(steps=4, guidance=1.0)
    args = (fp, _facts(), None, np.zeros(16, int), 101, cfg)
    assert gate_plan(close, far, *args)["helps"]
    assert not gate_plan(far, close, *args)["helps"]


def test_the_quick_presets_gate_costs_about_a_third_and_still_finds_the_bias():
    from ptqd.budget import PRESETS
    from ptqd.runtime.sampler import SamplerConfig

    def fp(x, t, ctx):
        return (0.5 * x).astype(np.float32)

    off = np.array([0.3, -0.2], np.float32).reshape(1, 2, 1, 1)

    def quant(x, t, ctx):
        return (0.5 * x + off).astype(np.float32)

    steps = [{"t": t, "k": 0.5, "k_raw": 0.5, "bias": off.reshape(-1).tolist(), "sigma_q": 0.0}
             for t in (1, 251, 501, 751)]
    cfg = SamplerConfig(steps=4, guidance=1.0)
    run = {}
    for name in ("default", "quick"):
        pre = PRESETS[name]
        table = CorrectionTable.from_json({"steps": steps})
        rec = gate_engine(quant, fp, table, _facts(), None, np.zeros(16, int), 101, cfg, ranges=pre.gate_ranges,
                          candidates=pre.gate_candidates, batch=8)
        assert all(s["parts"] == ["bias"] for s in rec["steps"]), (name, rec["steps"])
        run[name] = rec["engine_steps_run"]
    assert run["quick"] * 2.5 <= run["default"], run  # 28 against 78 engine steps here
    assert PRESETS["minimal"].gate_samples == 0  # full size: no gate, --correction auto applies nothing


def test_gate_keeps_a_part_that_moves_the_distribution_to_fps_without_hurting_single_samples():
    from ptqd.calib.gate import moment_distance

    rng = np.random.RandomState(3)
    ref = {eta: rng.randn(128, 2, 4) for eta in (0.0, 1.0)}
    noise = {eta: 0.5 * rng.randn(128, 2, 4) for eta in (0.0, 1.0)}

    def finals(cfg, eta):  # every config but a bias in the first range leaves a 0.2 mean shift
        shift = 0.0 if "bias" in cfg[0] else 0.2
        return ref[eta] + noise[eta] + shift, ref[eta]

    def error(cfg, eta):  # the paired error cannot tell the configs apart (a fixed per-sample error)
        return np.full(128, 0.3) + 0.01 * np.arange(128) / 128

    rec = gate(error, 4, step_ranges(4, 2), candidates=(("k",), ("bias",)), finals=finals)
    assert rec["parts"][:2] == [("bias",), ("bias",)] and rec["parts"][2:] == [(), ()], rec["parts"]
    kept = next(c for c in rec["ranges"][0]["candidates"] if c["parts"] == ["bias"])
    assert kept["distribution"]["delta"] < -3 * kept["distribution"]["se"]
    assert moment_distance(*finals(((),) * 4, 0.0)) > moment_distance(*finals((("bias",),) * 4, 0.0))
    # and a paired error that gets worse at one eta vetoes the same distribution gain
    rec = gate(lambda cfg, eta: error(cfg, eta) + (0.05 if "bias" in cfg[0] and eta else 0.0), 4,
               step_ranges(4, 2), candidates=(("bias",),), finals=finals)
    assert rec["parts"] == [()] * 4


@pytest.mark.parametrize("ranges,candidates", [(4, 4), (1, 2), (2, 3)])
def test_gate_runs_counts_the_sampling_the_gate_does(ranges, candidates):
    """gate_runs (what the gate's time budget is sized with) against the runner calls the gate makes."""
    from ptqd.budget import GATE_CANDIDATES
    from ptqd.calib.gate import gate_runs
    from ptqd.runtime.sampler import SamplerConfig

    calls = [0]
    off = np.array([0.3, -0.2], np.float32).reshape(1, 2, 1, 1)

    def fp(x, t, ctx):
        calls[0] += 1
        return (0.5 * x).astype(np.float32)

    def quant(x, t, ctx):
        calls[0] += 1
        return (0.5 * x + off).astype(np.float32)

    steps = [{"t": t, "k": 0.5, "k_raw": 0.5, "bias": off.reshape(-1).tolist(), "sigma_q": 0.01}
             for t in (1, 126, 251, 376, 501, 626, 751, 876)]
    cfg = SamplerConfig(steps=8, guidance=1.0)
    table = CorrectionTable.from_json({"steps": steps})
    gate_engine(quant, fp, table, _facts(), None, np.zeros(16, int), 101, cfg, ranges=ranges,
                candidates=GATE_CANDIDATES[:candidates], batch=8)
    runs = calls[0] / (8 * 2)  # 8 steps, 2 batches of 8 per run
    tried = sum("cond" not in c for c in GATE_CANDIDATES[:candidates])  # no conditional fit: "cond" is not tried
    assert runs == pytest.approx(gate_runs(ranges, tried), rel=0.01), (runs, gate_runs(ranges, tried))


def test_size_gate_narrows_candidates_then_ranges_then_samples():
    from ptqd.calib.gate import GATE_CANDIDATES, MIN_GATE_SAMPLES, NARROW_CANDIDATES, gate_runs, size_gate

    full = (128, 4, GATE_CANDIDATES)
    per = 0.01  # seconds per sample run
    cost = 3 * gate_runs(4, 4) * 128 * per
    assert size_gate(*full, per, 3, cost * 1.01)[:3] == full  # fits: untouched
    assert size_gate(*full, per, 3, 0)[:3] == full  # 0: no limit
    n, r, c, est, why = size_gate(*full, per, 3, 3 * gate_runs(4, 2) * 128 * per)
    assert (n, r, c) == (128, 4, NARROW_CANDIDATES) and len(why) == 1 and est <= 3 * gate_runs(4, 2) * 128 * per
    n, r, c, est, why = size_gate(*full, per, 3, 3 * gate_runs(1, 2) * 128 * per)
    assert (n, r) == (128, 1) and len(why) == 2
    n, r, c, est, why = size_gate(*full, per, 3, 3 * gate_runs(1, 2) * 40 * per)
    assert (n, r) == (40, 1) and est <= 3 * gate_runs(1, 2) * 40 * per * (1 + 1e-9) and why[-1] == "40 samples"
    n, *_ = size_gate(*full, per, 3, 1e-6)
    assert n == MIN_GATE_SAMPLES  # never fewer
