"""`ptqd compile` on the demo model: every PTQD stage, resumability, plan-driven sampling, BOPs."""

import json

import numpy as np
import pytest

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.cli import main
from ptqd.errors import UserError

from tests.conftest import SMALL_COMPILE as SMALL


def test_compile_runs_every_stage_and_writes_corrections_and_plan(compiled):
    out, res, log = compiled
    assert list(res["stages"]) == ["export", "calibrate", "build", "correct", "plan"]
    assert all(v != "reused" for v in res["stages"].values()) and len(log) == 5
    b = Bundle.open(out)
    corr = b.read_json("calib/correction.json")
    assert set(corr["precisions"]) == {"w8a8", "w4a8", "w4a4"}
    steps = corr["precisions"]["w4a4"]["steps"]
    assert [s["t"] for s in steps] == list(range(901, 0, -100))  # the calibrated 10-step schedule
    for s in steps:
        assert s["k"] >= 0 and s["sigma_q"] > 0 and len(s["bias"]) == 3
        assert s["holdout_gated"]["mse_corrected"] <= s["holdout"]["mse_uncorrected"] * (1 + 1e-9)
    assert corr["config"]["holdout"] == 4 and corr["config"]["guidance"] == 3.0
    # the end-to-end gate ran on every built precision, on its own seed, and its choice is what auto applies
    sized = corr["config"]["gate"].pop("sized")
    assert corr["config"]["gate"] == {"samples": 24, "seed": 101, "ranges": 4, "budget_s": 150.0,
                                      "candidates": ["k", "bias", "k+bias", "cond"]}
    # the demo's gate fits its time budget whole (measured cost of a sampler step on the engine)
    assert sized["narrowed"] == [] and sized["samples"] == 24 and sized["ranges"] == 4
    assert 0 < sized["seconds_per_sample_run"] and sized["estimated_s"] < 150
    for p, rec in corr["precisions"].items():
        g = rec["gate"]
        assert [s["t"] for s in g["steps"]] == [s["t"] for s in rec["steps"]] and g["samples"] == 24
        assert all(set(s["parts"]) <= {"k", "bias", "vsc", "cond"} for s in g["steps"])
        assert len(rec["conditional"]["steps"]) == 10 and len(rec["conditional"]["steps"][0]["a"]) == 3
        assert corr["summary"][p]["applied"] == [("+".join(s["parts"]) or "none") for s in g["steps"]]
    plan = b.read_json("calib/plan.json")
    assert len(plan["steps"]) == 10 and set(res["plan"]) <= {"w8a8", "w4a8", "w4a4"}
    assert plan["criterion_name"] == "sensitivity" and plan["budget"] == 0.9
    assert all(set(s["damage"]) == {"w8a8", "w4a4"} for s in plan["steps"])
    bo = res["bops"]
    assert bo["plan"]["mean_bops_per_forward"] <= 0.9 * bo["precisions"]["w4a8"]["bops"] * (1 + 1e-9)
    assert all(s["snr_f"] > 0 and set(s["snr_q"]) == {"w8a8", "w4a8", "w4a4"} for s in plan["steps"])


def test_snr_plan_gives_noisier_steps_no_more_bits(compiled, tmp_path):
    import shutil

    out = tmp_path / "snr.bundle"
    shutil.copytree(compiled[0], out)
    plan = api.plan(out, criterion="snr")
    rank = {p: i for i, p in enumerate(plan["precisions_by_cost"])}
    ranks = [rank[s["precision"]] for s in plan["steps"]]
    assert ranks == sorted(ranks) and plan["criterion_name"] == "snr"
    with pytest.raises(UserError, match="criterion"):
        api.plan(out, criterion="magic")


def test_compile_is_resumable_and_reruns_only_what_changed(compiled):
    out, _, _ = compiled
    res = api.compile("demo", out, progress=False, log=lambda *_: None, **SMALL)
    assert set(res["stages"].values()) == {"reused"}
    res = api.compile("demo", out, progress=False, log=lambda *_: None, margin=50.0, **SMALL)
    assert [k for k, v in res["stages"].items() if v != "reused"] == ["plan"]
    assert Bundle.open(out).stage("plan")["margin"] == 50.0
    res = api.compile("demo", out, progress=False, log=lambda *_: None, **SMALL)  # margin back to 1
    assert [k for k, v in res["stages"].items() if v != "reused"] == ["plan"]


def test_interrupted_correct_leaves_the_bundle_intact_and_compile_resumes(compiled, tmp_path, monkeypatch):
    import shutil

    src, _, _ = compiled
    out = tmp_path / "copy.bundle"
    shutil.copytree(src, out)
    with Bundle.transaction(out) as w:  # as if the correction had never run
        for rel in ("calib/correction.json", "calib/plan.json"):
            w.remove(rel)
        w.drop_stage("correct")
        w.drop_stage("plan")
    before = json.loads((out / "manifest.json").read_text())

    import ptqd.calib.correction as corr

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(corr, "fit_precision", boom)
    with pytest.raises(KeyboardInterrupt):
        api.compile("demo", out, progress=False, log=lambda *_: None, **SMALL)
    assert json.loads((out / "manifest.json").read_text()) == before
    Bundle.open(out).verify_all()
    monkeypatch.undo()
    res = api.compile("demo", out, progress=False, log=lambda *_: None, **SMALL)
    assert [k for k, v in res["stages"].items() if v != "reused"] == ["correct", "plan"]


def test_plan_sampling_switches_engines_per_step(compiled):
    from ptqd.runtime.loader import step_engines
    from ptqd.runtime.correction import StepEngines
    from ptqd.runtime.pipeline import sample_latents

    out, _, _ = compiled
    b = Bundle.open(out)
    pl = [s["precision"] for s in b.read_json("calib/plan.json")["steps"]]
    eng, label = step_engines(b, "auto", "on")
    assert isinstance(eng, StepEngines) and label == "plan+ptqd-raw"
    cfg = api.sampler_config(b.facts, 10, 1.0, 3.0)
    table = np.load(b.path(api.CLASS_EMBEDDING))
    lat = sample_latents(eng, b.facts, table, np.array([1, 2]), np.arange(2), 0, cfg)
    assert np.isfinite(lat).all()
    assert eng.switches == sum(a != c for a, c in zip(pl, pl[1:]))
    # the same plan with every engine forced to one precision is a different sampler
    fixed, label = step_engines(b, "w4a4", "off")
    assert label == "w4a4" and not isinstance(fixed, StepEngines)
    cond, label = step_engines(b, "w4a4", "conditional")
    assert label == "w4a4+cond" and cond.use == ("cond", "vsc") and cond.corrections["w4a4"].a is not None
    auto, label = step_engines(b, "w4a4", "auto")
    assert label == "w4a4+ptqd" and auto.corrections["w4a4"].parts is not None


def test_correction_changes_samples_only_where_it_was_kept(compiled):
    out, _, _ = compiled
    off, _ = api.sample(out, num=4, steps=10, eta=1.0, precision="w4a4", correction="off", progress=False)
    on, _ = api.sample(out, num=4, steps=10, eta=1.0, precision="w4a4", correction="on", progress=False)
    assert off.shape == on.shape and not np.array_equal(off, on)  # VSC at eta 1 always acts (sigma_q > 0)


def test_sample_plan_file_and_errors(compiled, tmp_path, capsys):
    out, _, _ = compiled
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps({"steps": [{"t": 901, "precision": "w4a4"}, {"t": 1, "precision": "w8a8"}]}))
    assert main(["sample", str(out), "--plan", str(pf), "--num", "2", "--steps", "10"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["sample", str(out), "--plan", str(bad), "--num", "1"]) == 1
    assert "not a plan file" in capsys.readouterr().err
    assert main(["sample", str(out), "--plan", "w2a2", "--num", "1"]) == 1
    assert "no w2a2 engine" in capsys.readouterr().err


def test_correction_on_needs_a_fitted_correction(tiny_cin_bundle):
    from ptqd.runtime.loader import step_engines

    b = Bundle.open(tiny_cin_bundle)
    with pytest.raises(UserError, match="not calibrated"):
        api.correct(tiny_cin_bundle, progress=False)
    with pytest.raises(UserError, match="no plan"):
        step_engines(b, "auto")
    with pytest.raises(UserError, match="ptqd correct"):
        step_engines(b, "w4a4", "on")


def test_inspect_and_eval_report_bops(compiled, capsys):
    out, _, _ = compiled
    info = api.inspect(out)
    bo = info["bops"]
    assert bo["fp32"] == pytest.approx(1024 * (info["macs_by_kind"]["conv"] + info["macs_by_kind"]["linear"]))
    p = bo["precisions"]
    assert bo["fp32"] > p["w8a8"]["bops"] > p["w4a8"]["bops"] > p["w4a4"]["bops"]
    lo, hi = p["w4a4"]["bops"], p["w8a8"]["bops"]
    assert lo <= bo["plan"]["mean_bops_per_forward"] <= hi
    assert main(["inspect", str(out)]) == 0
    assert "BOPs/fwd" in capsys.readouterr().out
    rep = api.evaluate(out, precisions=["w4a4", "auto"], num=6, steps=10, progress=False, write_report=False)
    rows = {r["precision"]: r for r in rep["rows"]}
    assert set(rows) == {"fp32", "w4a4+ptqd", "plan+ptqd"}
    assert rows["fp32"]["bops_saving"] == pytest.approx(1.0)
    assert rows["w4a4+ptqd"]["bops_saving"] == pytest.approx(bo["fp32"] / lo)


def test_ablation_rows(compiled):
    res = api.ablation(compiled[0], precisions=("w4a4",), num=4, steps=10, progress=False)
    assert [r["precision"] for r in res["eta0"]["rows"]] == ["fp32", "w4a4", "w4a4+k", "w4a4+k+bias"]
    assert [r["precision"] for r in res["eta1"]["rows"]] == ["fp32", "w4a4", "w4a4+k+bias", "w4a4+k+bias+vsc"]
    assert res["eta1"]["config"]["eta"] == 1.0


@pytest.mark.parametrize("kw, what", [({"gate_samples": -1}, "--gate-samples"), ({"gate_ranges": 0}, "--gate-ranges"),
                                      ({"gate_samples": 2.5}, "--gate-samples")])
def test_bad_gate_options_stop_compile_before_any_stage_runs(tmp_path, kw, what):
    with pytest.raises(UserError, match=what):
        api.compile("demo", tmp_path / "g.bundle", progress=False, log=lambda *a: None, **kw)
    assert not (tmp_path / "g.bundle").exists()


def test_correct_without_a_gate_applies_nothing_and_says_so(compiled, tmp_path):
    import shutil

    out = tmp_path / "nogate.bundle"
    shutil.copytree(compiled[0], out)
    rec = api.correct(out, samples=6, holdout=2, gate_samples=0, progress=False)
    assert rec["config"]["gate"] is None
    for s in rec["summary"].values():
        assert "no gate (gate off" in s["applied"]
    from ptqd.bundle import Bundle
    from ptqd.runtime.loader import step_engines

    eng, label = step_engines(Bundle.open(out), "w4a8", "auto")
    assert all(p == () for p in eng.corrections["w4a8"].parts)  # auto applies nothing


def test_compile_backend_is_onnxruntime_or_auto(tmp_path):
    from ptqd import api
    from ptqd.errors import UserError

    with pytest.raises(UserError, match="onnxruntime or auto"):
        api.compile("demo", tmp_path / "x.bundle", backend="openvino", log=lambda m: None)
    assert not (tmp_path / "x.bundle").exists()


def test_a_budget_no_built_engine_can_meet_is_refused_before_measuring(compiled, tmp_path, monkeypatch):
    import shutil

    from ptqd.stages import plan as plan_stage

    out = tmp_path / "p.bundle"
    shutil.copytree(compiled[0], out)

    def measured(*_a, **_k):
        raise AssertionError("measured the damage of a plan that cannot fit")

    monkeypatch.setattr(plan_stage, "measure_damage", measured)
    with pytest.raises(UserError, match=r"add w4a4 to --precisions.*raise --budget to at least 1"):
        api.plan(out, precisions=["w8a8", "w4a8"], budget=0.9)
