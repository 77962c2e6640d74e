"""The correction is fitted, gated and planned on the sampler a bundle samples with by default (its pipeline's
own scheduler), at the timesteps that sampler visits: PNDM (one timestep twice), Euler on linspace spacing
(fractional timesteps), DPM-Solver++ 2M with Karras sigmas (multistep: the gate and the plan cannot resume)."""

import json
import shutil

import numpy as np
import pytest

from ptqd import api
from ptqd.bundle import Bundle

CASES = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler-linspace": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}
STEPS = 5


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    from ptqd.models.tiny_sd import write_tiny_sd_pipeline

    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


def with_scheduler(base, out, cls, config):
    shutil.copytree(base, out)
    f = out / "scheduler/scheduler_config.json"
    f.write_text(json.dumps(dict(json.loads(f.read_text()), _class_name=cls, **config)))
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers", cls])))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_correction_gate_and_plan_use_the_bundles_own_sampler(base_pipeline, tmp_path, case):
    from ptqd.calib.correction import trajectory_timesteps
    from ptqd.runtime.correction import CorrectionTable, Plan
    from ptqd.runtime.loader import sampler_config
    from ptqd.runtime.pipeline import scheduler_for

    cls, config = CASES[case]
    src = with_scheduler(base_pipeline, tmp_path / "pipe", cls, config)
    out = tmp_path / "b.bundle"
    api.compile(src, out, precisions=("w8a8", "w4a8", "w4a4"), samples=4, steps=STEPS, correction_samples=4, holdout=2,
                preset="minimal", gate_samples=4, gate_ranges=2, progress=False, log=lambda m: None,
                prompts=["a red cat", "the dog on a photo"])
    b = Bundle.open(out)
    facts = b.facts
    own = sampler_config(facts, STEPS, 0.0, 3.0, "auto")
    calls = [float(t) for t in scheduler_for(facts, own).timesteps]
    want = list(dict.fromkeys(calls))  # distinct, in visiting order
    ddim = [float(t) for t in trajectory_timesteps(facts, sampler_config(facts, STEPS, 0.0, 3.0))]
    if case == "pndm":  # DDIM's spacing, but PLMS calls the UNet twice at one timestep
        assert want == ddim and len(calls) == len(want) + 1
    else:
        assert want != ddim  # so the test can tell a DDIM fit from the sampler's
    if case == "euler-linspace":
        assert any(not t.is_integer() for t in want)

    corr = b.read_json("calib/correction.json")
    assert corr["config"]["sampler"] == own.sampler_name == api.inspect(out)["correction"]["sampler"]
    fit = corr["precisions"]["w8a8"]
    assert [float(s["t"]) for s in fit["steps"]] == want
    assert [float(s["t"]) for s in fit["conditional"]["steps"]] == want
    gate = fit["gate"]
    assert [float(s["t"]) for s in gate["steps"]] == want
    assert gate["etas"] == [0.0] and gate["sampler"] == own.sampler_name  # η is DDIM's
    if case == "dpm++2m-karras":  # each candidate ran whole: more steps than a resumed gate would
        assert gate["engine_steps_run"] >= len(gate["ranges"]) * len(want)

    plan = b.read_json("calib/plan.json")
    assert [float(s["t"]) for s in plan["steps"]] == want
    pl = Plan.from_json(plan)
    assert [pl.at(t) for t in want] == [s["precision"] for s in plan["steps"]]

    # at sampling time the table gives the fitted coefficients at each visited timestep, not an interpolation
    tab = CorrectionTable.from_json(fit, applied=True)
    for s in fit["steps"]:
        got = tab.at(float(s["t"]))
        raw = s.get("raw", s)
        assert got.k == pytest.approx(raw["k"], abs=1e-12)
        np.testing.assert_allclose(got.bias, raw["bias"], atol=1e-12)
    assert tab.parts == [tuple(s["parts"]) for s in sorted(gate["steps"], key=lambda s: s["t"])]

    images, _ = api.sample(out, prompts=["a red cat"], num=1, steps=STEPS, precision="auto")
    assert images.shape[0] == 1 and images.std() > 1


def test_fake_quant_buckets_are_picked_by_timestep_as_the_engines_pick_them():
    from ptqd.engines.runner import nearest_bucket

    ranges = [(500, 999), (0, 450)]  # calibrate's order; BucketedRunner sorts them ascending
    assert [nearest_bucket(t, ranges) for t in (999, 500, 480.5, 470, 450, 0)] == [0, 0, 0, 1, 1, 1]
    # a timestep halfway between two buckets: the same (lower) bucket whichever order they come in
    assert nearest_bucket(475, ranges) == 1 and nearest_bucket(475, ranges[::-1]) == 0


def test_calibrated_with_eta_the_fit_and_the_plan_both_run_ddim(base_pipeline, tmp_path):
    """η is DDIM's: trajectories calibrated at η > 0 fit the correction on DDIM even for a DPM-Solver++ pipeline,
    and the plan measures on the same DDIM timesteps (it used to ask for the pipeline's, and refuse)."""
    from ptqd.calib.correction import trajectory_timesteps
    from ptqd.runtime.loader import sampler_config

    src = with_scheduler(base_pipeline, tmp_path / "pipe", *CASES["dpm++2m-karras"])
    out = tmp_path / "b.bundle"
    api.export(src, out, progress=False, prompts=["a red cat", "the dog on a photo"])
    api.calibrate(out, samples=4, steps=STEPS, eta=0.5, preset="minimal", progress=False)
    api.build(out, precisions=("w8a8", "w4a8", "w4a4"), progress=False)
    rec = api.correct(out, samples=4, holdout=2, preset="minimal", gate_samples=4, gate_ranges=1, progress=False)
    assert rec["config"]["sampler"] == "ddim"
    plan = api.plan(out, preset="minimal", progress=False)
    facts = Bundle.open(out).facts
    ddim = trajectory_timesteps(facts, sampler_config(facts, STEPS, 0.0, 3.0))
    assert [s["t"] for s in plan["steps"]] == ddim
