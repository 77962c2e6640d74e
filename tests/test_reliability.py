"""Issue 15 (reliability): one test per numbered defect, seeded fuzzing of manifests and CLI arguments,
and concurrent writers on one bundle. Everything runs on tiny bundles, in-process, in seconds."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import shutil
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml

from ptqd import api
from ptqd.bundle import MANIFEST, Bundle
from ptqd.cli import main
from ptqd.errors import BundleError, NonFiniteError, UserError
from ptqd.engines.runner import Runner


# ---- helpers -------------------------------------------------------------------------------------
from tests.conftest import edit_manifest as _edit_manifest  # noqa: E402
from tests.conftest import make_bundle as _make  # noqa: E402


def _run(argv) -> tuple[int, str, str]:
    """``ptqd ARGV`` in-process: (exit code, stdout, stderr). An exception escaping main is a test failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # --help / --version only
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _one_line_error(res, *needles):
    rc, _, err = res
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("ptqd: error: "), (rc, err)
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture
def cin(tiny_cin_bundle, tmp_path) -> Path:
    d = tmp_path / "cin.bundle"
    shutil.copytree(tiny_cin_bundle, d)
    return d


def _strict_json(text: str):
    def refuse(c):
        raise ValueError(f"{c} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ---- 1. cleanup takes bundle names literally, and never a live writer's files ---------------------
@pytest.mark.parametrize("pattern", ["g?", "g[1]", "*", "g*"])
def test_1_cleanup_matches_names_literally_and_spares_a_live_writer(tmp_path, pattern):
    _make(tmp_path / "g1")
    with Bundle.transaction(tmp_path / "g1") as w:  # g1 is being built: its lock is held, its staging dir live
        w.write_bytes("new.bin", b"n")
        _one_line_error(_run(["inspect", tmp_path / pattern]), "bundle not found")
        assert w.staging.is_dir(), f"`ptqd inspect {pattern!r}` deleted g1's staging directory"
    assert Bundle.open(tmp_path / "g1").read_bytes("new.bin") == b"n"


def test_1_recovery_never_renames_another_bundles_backup(tmp_path):
    _make(tmp_path / "a1")
    os.rename(tmp_path / "a1", tmp_path / ".a1.old-deadbeef")  # a1's swap died between its two renames
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "a?")
    assert (tmp_path / ".a1.old-deadbeef").is_dir() and not (tmp_path / "a?").exists()
    assert Bundle.open(tmp_path / "a1").read_bytes("a/data.bin") == b"v1"  # a1's own recovery still works


# ---- 2. the writer lock covers what a stage reads: concurrent writers, no lost update -------------
def _fake_calibration(bundle: Path, precisions=("w8a8", "w4a4")) -> None:
    buf = io.BytesIO()
    np.savez(buf, w=np.zeros(1, np.float32))
    with Bundle.transaction(bundle) as w:
        for p in precisions:
            w.write_json(f"calib/{p}.json", {"layers": []})
            w.write_bytes(f"calib/{p}.npz", buf.getvalue())
        w.set_stage("calibrate", {"config": {"steps": 2, "eta": 0.0, "guidance": 3.0},
                                  "buckets": [{"steps": [0, 1], "t_range": [1, 501]}]})


def _fake_engine_builder(monkeypatch, started: threading.Event, delay: float):
    """build()'s heavy parts replaced: a build takes ``delay`` seconds and writes small files."""
    import ptqd.engines.onnxruntime as ort_backend
    from ptqd.calib import calibrate
    from ptqd.engines import qdq

    def build_engine(qdq_path, eng_path):
        started.set()
        time.sleep(delay)
        Path(eng_path).write_bytes(b"engine " + Path(qdq_path).read_bytes())

    monkeypatch.setattr(calibrate, "load_params", lambda meta, arrays: [])
    def write_qdq(src, layers, path, rewrite=None, attention=(), **options):
        Path(path).write_bytes(b"qdq")
        return {"quantized_nodes": 0, "graph": {}}

    monkeypatch.setattr(qdq, "write_qdq", write_qdq)
    monkeypatch.setattr(ort_backend, "build_engine", build_engine)
    monkeypatch.setattr(ort_backend, "describe_engine", lambda path, rows: {
        "size_bytes": Path(path).stat().st_size, "integer_kernel_ops": {}, "integer_mac_share": 0.0})


def test_2_two_concurrent_builds_serialize_and_lose_no_update(cin, monkeypatch):
    _fake_calibration(cin)
    started = threading.Event()
    _fake_engine_builder(monkeypatch, started, delay=0.4)
    errors = []

    def build(p):
        try:
            api.build(cin, precisions=(p,), validate=False, progress=False)
        except BaseException:
            errors.append((p, traceback.format_exc()))
            raise

    first = threading.Thread(target=build, args=("w8a8",))
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=build, args=("w4a4",))  # starts while the first is mid-build
    second.start()
    first.join(20)
    second.join(20)
    assert not errors, errors
    b = Bundle.open(cin)
    b.verify_all()
    built = b.read_json(api.BUILD_JSON)
    assert set(built) == {"w8a8", "w4a4"}, f"lost update: build.json lists only {sorted(built)}"
    assert b.stage("build")["precisions"] == ["w4a4", "w8a8"]
    assert b.has("engines/onnxruntime/w8a8.onnx") and b.has("engines/onnxruntime/w4a4.onnx")


def test_2_two_writer_processes_serialize(tmp_path):
    """The same through the kernel: two processes each read a counter, wait, write counter + 1."""
    import subprocess
    import sys

    _make(tmp_path / "b")
    with Bundle.transaction(tmp_path / "b") as w:
        w.write_json("counter.json", {"n": 0})
    code = ("import json, sys, time\n"
            "from ptqd.bundle import Bundle, writes_bundle\n"
            "@writes_bundle()\n"
            "def bump(bundle):\n"
            "    n = Bundle.open(bundle).read_json('counter.json')['n']\n"
            "    time.sleep(0.5)\n"
            "    with Bundle.transaction(bundle) as w:\n"
            "        w.write_json('counter.json', {'n': n + 1})\n"
            "bump(sys.argv[1])\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b")], env=env, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert Bundle.open(tmp_path / "b").read_json("counter.json") == {"n": 2}


def test_2_a_reader_overtaken_by_a_commit_is_told_so_not_that_the_file_is_damaged(tmp_path):
    b = _make(tmp_path / "b")
    with Bundle.transaction(tmp_path / "b") as w:
        w.write_bytes("a/data.bin", b"v2")
    with pytest.raises(BundleError, match="updated by another ptqd process while this one was reading"):
        b.read_bytes("a/data.bin")


# ---- 3. an interrupted `ptqd correct` keeps a valid plan ------------------------------------------
def _fake_correction_fit(monkeypatch):
    import ptqd.calib.correction as corr
    import ptqd.stages.correct as correct_stage

    class Model:
        def eval(self):
            return self

    step = {"t": 1, "k": 0.0, "bias": [0.0, 0.0, 0.0], "sigma_q": 0.1, "gate": "none", "raw": {"k_raw": 0.0},
            "holdout": {"explained_variance": 0.0, "mse_uncorrected": 1.0, "mse_corrected": 1.0},
            "holdout_gated": {"mse_corrected": 1.0}}
    monkeypatch.setattr(correct_stage, "load_source", lambda b: type("Loaded", (), {"unet": Model()})())
    monkeypatch.setattr(correct_stage, "fake_quant_runners", lambda *a, **k: {})
    monkeypatch.setattr(corr, "collect", lambda *a, **k: (None, None, {"w8a8": None}))
    monkeypatch.setattr(corr, "fit_precision", lambda *a, **k: {"steps": [dict(step)]})
    monkeypatch.setattr(corr, "fit_conditional", lambda *a, **k: {"steps": []})


def test_3_interrupted_correct_keeps_the_plan(cin, monkeypatch):
    _fake_calibration(cin, ("w8a8",))
    with Bundle.transaction(cin) as w:  # a corrected bundle with a plan (fp32 at every step: runs on the FP graph)
        w.write_json("calib/correction.json", {"precisions": {}})
        w.write_json("calib/plan.json", {"steps": [{"t": 501, "precision": "fp32"}, {"t": 1, "precision": "fp32"}]})
        w.set_stage("plan", {"inputs": {}, "plan": ["fp32", "fp32"]})
    assert _run(["sample", cin, "--plan", "auto", "--num", "1", "--steps", "2"])[0] == 0
    _fake_correction_fit(monkeypatch)

    def killed(*a, **k):  # the process dies after the correction's commit, before the plan's
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "plan", killed)
    assert _run(["correct", cin, "--samples", "4", "--holdout", "1"])[0] == 130
    b = Bundle.open(cin)
    assert b.read_json("calib/correction.json")["config"]["samples"] == 4  # the new correction landed
    rc, _, err = _run(["sample", cin, "--plan", "auto", "--num", "1", "--steps", "2"])
    assert rc == 0, err
    from ptqd.bundle.layout import CORRECTION_JSON
    from ptqd.stages.common import digest

    assert b.stage("plan")["inputs"] != digest(b, (CORRECTION_JSON, api.BUILD_JSON))  # compile will redo it


# ---- 4. the user's own files in a bundle are left alone -------------------------------------------
def test_4_user_files_survive_every_stage(cin):
    (cin / "NOTES.txt").write_text("mine")
    (cin / "reports" / "my_plot.py").write_text("print(1)")
    (cin / "scratch").mkdir()
    os.symlink("NOTES.txt", cin / "notes-link")
    assert _run(["eval", cin, "--num", "1", "--steps", "1"])[0] == 0  # a stage that writes a report
    b = Bundle.open(cin)
    assert b.has("reports/eval.json") and not b.has("NOTES.txt")
    assert (cin / "NOTES.txt").read_text() == "mine" and (cin / "reports" / "my_plot.py").read_text() == "print(1)"
    assert (cin / "scratch").is_dir() and os.readlink(cin / "notes-link") == "NOTES.txt"
    with Bundle.transaction(cin, create=True) as w:  # even a re-export over the bundle keeps them
        w.write_bytes("x.bin", b"x")
    assert (cin / "NOTES.txt").read_text() == "mine" and not (cin / "unet.onnx").exists()


def test_4_a_users_symlink_where_ptqd_writes_a_folder_is_never_written_through(tmp_path):
    _make(tmp_path / "b")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "b" / "calib")
    with pytest.raises(BundleError, match="calib in the bundle is not ptqd's folder"), \
            Bundle.transaction(tmp_path / "b") as w:
        w.write_json("calib/x.json", {})
    assert not list((tmp_path / "elsewhere").iterdir()) and (tmp_path / "b" / "calib").is_symlink()


# ---- 5. a symlinked bundle root: the real directory is updated, the link stays ---------------------
def test_5_symlinked_bundle_root_updates_the_real_directory(tmp_path):
    _make(tmp_path / "realb")
    os.symlink("realb", tmp_path / "linkb")
    with Bundle.transaction(tmp_path / "linkb") as w:
        w.write_bytes("new.bin", b"n")
    assert (tmp_path / "linkb").is_symlink() and os.readlink(tmp_path / "linkb") == "realb"
    assert Bundle.open(tmp_path / "realb").read_bytes("new.bin") == b"n"
    assert Bundle.open(tmp_path / "linkb").read_bytes("new.bin") == b"n"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".linkb")]  # one lock: the real name's


# ---- 6. no silent wrong output -----------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--guidance", "nan"), ("--guidance", "inf"), ("--eta", "nan"),
                                        ("--guidance", "-inf")])
def test_6_non_finite_sampling_options_are_refused(cin, flag, value):
    _one_line_error(_run(["sample", cin, flag, value, "--num", "1", "--steps", "2"]), flag)


@pytest.mark.parametrize("where,value,needle", [
    (("schedule", "beta_start"), float("nan"), "beta_start"),
    (("schedule", "beta_end"), 5, "beta_end"),
    (("schedule", "beta_start"), 0.5, "beta_start"),  # > beta_end: the noise would shrink with t
    (("scale_factor",), 0, "scale_factor"),
    (("scale_factor",), float("inf"), "scale_factor"),
    (("schedule", "num_train_timesteps"), 10 ** 9, "num_train_timesteps"),
    (("latent_shape",), [3, 8, 0], "latent_shape"),
    (("conditioning", "null_class"), 11, "null_class"),
])
def test_6_model_facts_are_validated(cin, where, value, needle):
    def edit(m):
        d = m["model"]
        for k in where[:-1]:
            d = d[k]
        d[where[-1]] = value

    _edit_manifest(cin, edit)
    _one_line_error(_run(["sample", cin, "--num", "1", "--steps", "2", "--out", cin.parent / "s.npz"]), needle)
    assert not (cin.parent / "s.npz").exists()


def test_6_quantized_engine_refuses_nan_and_inf_inputs(tiny_cin_bundle, tmp_path):
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ptqd.engines.onnxruntime import OrtRunner

    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(tiny_cin_bundle / "unet.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    runner = OrtRunner(tmp_path / "q.onnx")
    rng = np.random.RandomState(0)
    x, t = rng.standard_normal((2, 3, 8, 8)).astype(np.float32), np.full(2, 501.0, np.float32)
    ctx = rng.standard_normal((2, 1, 32)).astype(np.float32)
    assert np.isfinite(runner(x, t, ctx)).all()
    hidden = x.copy()
    hidden.flat[0] = np.nan
    assert np.isfinite(runner.infer(hidden, t, ctx)).all()  # what the engine makes of it: plausible numbers
    for name, bad in (("x", np.nan), ("x", np.inf), ("context", -np.inf), ("t", np.nan)):
        feeds = {"x": x.copy(), "t": t.copy(), "context": ctx.copy()}
        feeds[name].flat[0] = bad
        with pytest.raises(NonFiniteError, match=f"NaN/Inf value.*input {name}"):
            runner(feeds["x"], feeds["t"], feeds["context"])


# ---- 7. one line instead of a traceback --------------------------------------------------------------
@pytest.mark.parametrize("size", ["missing", "12", 1.5, None, True, -5])
def test_7_manifest_file_size_must_be_a_byte_count(cin, size):
    def edit(m):
        rec = m["files"]["unet.layers.json"]
        if size == "missing":
            del rec["size"]
        else:
            rec["size"] = size

    _edit_manifest(cin, edit)
    _one_line_error(_run(["inspect", cin]), "size")


@pytest.mark.parametrize("schema", [1, 99])
def test_7_producer_must_be_an_object(cin, schema):
    _edit_manifest(cin, lambda m: m.update(producer="ptqd 9", schema_version=schema))
    _one_line_error(_run(["inspect", cin]), "newer" if schema == 99 else "producer")


@pytest.mark.parametrize("argv,needle", [
    (["--steps", "1000"], "--steps must be between 1 and 999"),
    (["--steps", "0"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--seed", "-1"], "--seed"),
    (["--num", "0"], "--num"),
])
def test_7_sampling_options_out_of_range(cin, argv, needle):
    _one_line_error(_run(["sample", cin, "--num", "1", *argv]), needle)


@pytest.mark.parametrize("plan", [{"steps": []}, {"steps": [{"t": "x", "precision": "fp32"}]}, [1],
                                  {"steps": [{"t": 1e400, "precision": "fp32"}]}, {"steps": [{"t": 1}]},
                                  {"steps": [{"t": 1, "precision": ["fp32"]}]}])
def test_7_bad_plan_files(cin, tmp_path, plan):
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps(plan))
    _one_line_error(_run(["sample", cin, "--plan", pf, "--num", "1", "--steps", "2"]), "not a plan file")


def test_7_unwritable_out_is_refused_before_sampling(cin, tmp_path, monkeypatch):
    from ptqd.runtime import pipeline

    def never(*a, **k):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(pipeline, "sample_latents", never)
    (tmp_path / "afile").write_text("x")
    _one_line_error(_run(["sample", cin, "--num", "1", "--out", tmp_path / "afile" / "x.png"]), "not a directory")
    (tmp_path / "d.png").mkdir()
    _one_line_error(_run(["sample", cin, "--num", "1", "--out", tmp_path / "d.png"]), "is a directory")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            _one_line_error(_run(["sample", cin, "--num", "1", "--out", ro / "x.png"]), "permission")
        finally:
            ro.chmod(0o700)


def _config_variant(tiny_cin_ckpt, tmp_path, edit) -> Path:
    from ptqd.models.tiny import tiny_cin_config

    cfg = tiny_cin_config()
    edit(cfg["model"]["params"])
    p = tmp_path / "variant.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.parametrize("edit,needle", [
    (lambda p: p["unet_config"]["params"].update(model_channels="abc"), "model_channels"),
    (lambda p: p.update(timesteps="abc"), "timesteps"),
    (lambda p: p["unet_config"]["params"].update(num_res_blocks=[1, 2]), "num_res_blocks"),
    (lambda p: p["unet_config"]["params"].update(channel_mult=5), "channel_mult"),
    (lambda p: p["unet_config"]["params"].update(use_spatial_transformer="yes"), "use_spatial_transformer"),
    (lambda p: p["cond_stage_config"]["params"].update(n_classes="ten"), "n_classes"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(ch="abc"), "ch"),
    (lambda p: p.update(linear_start=[0.1]), "linear_start"),
    (lambda p: p.update(linear_end=2.0), "is not valid: beta_end"),
    (lambda p: p.update(scale_factor="big"), "scale_factor"),
    (lambda p: p["unet_config"]["params"].update(num_res_blocks=100000000), "num_res_blocks"),
    (lambda p: p["unet_config"]["params"].update(model_channels=8192, channel_mult=[1, 2, 4, 8],
                                                 num_res_blocks=64), "billion parameters"),
])
def test_7_compvis_config_type_and_size_errors(tiny_cin_ckpt, tmp_path, edit, needle):
    cfg = _config_variant(tiny_cin_ckpt, tmp_path, edit)
    t0 = time.perf_counter()
    _one_line_error(_run(["export", tiny_cin_ckpt, "--config", cfg, "--out", tmp_path / "b"]), needle)
    assert time.perf_counter() - t0 < 5, "refused, but not quickly"
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("stage,edit", [
    ("calibrate", lambda r: r["config"].pop("eta")),
    ("calibrate", lambda r: r.update(buckets="all")),
    ("calibrate", lambda r: r.pop("config")),
    ("export", lambda r: r.update(source=7)),
])
def test_7_damaged_stage_records_are_one_line(cin, stage, edit):
    _fake_calibration(cin)

    def damage(m):
        edit(m["stages"][stage])

    _edit_manifest(cin, damage)
    for argv in (["correct", cin, "--samples", "4", "--holdout", "1"], ["build", cin, "--no-validate"],
                 ["inspect", cin]):
        _one_line_error(_run(argv), f"stage record {stage!r}")


def test_7_manifest_facts_that_contradict_the_source_model(cin, monkeypatch):
    _fake_calibration(cin)
    _edit_manifest(cin, lambda m: m["model"]["conditioning"].update(context_dim=64))
    _one_line_error(_run(["correct", cin, "--samples", "4", "--holdout", "1"]), "is not the source model's")


def test_7_a_bug_exits_2_with_its_traceback_and_asks_for_a_report(cin, monkeypatch):
    def bug(*a, **k):
        return {}["missing"]

    monkeypatch.setattr(api, "inspect", bug)
    rc, _, err = _run(["inspect", cin])
    assert rc == 2 and "Traceback" in err and "KeyError" in err and "bug in ptqd" in err and "report" in err
    rc, _, err = _run(["--debug", "inspect", cin])
    assert rc == 2 and "Traceback" in err


def test_error_split_validation_is_one_line_naming_the_check_internal_is_a_bug(cin, monkeypatch):
    """ValidationError: one line naming the check, exit 1. InternalError (ptqd broke its own invariant,
    e.g. a TensorRT graph its linter rejects): the traceback and a report request, exit 2."""
    from ptqd.errors import InternalError, ValidationError

    def failed(*a, **k):
        raise ValidationError("engine vs fake-quant model", "w8a8: 3 of 40 integer kernels differ")

    monkeypatch.setattr(api, "inspect", failed)
    _one_line_error(_run(["inspect", cin]), "validation failed (engine vs fake-quant model): w8a8")

    def broken(*a, **k):
        raise InternalError("w8a8.qdq.onnx breaks 1 TensorRT rule(s)")

    monkeypatch.setattr(api, "inspect", broken)
    rc, _, err = _run(["inspect", cin])
    assert rc == 2 and "Traceback" in err and "InternalError" in err and "bug in ptqd" in err


# ---- 8. minor ---------------------------------------------------------------------------------------
def test_8_absurd_file_size_is_refused(cin):
    _edit_manifest(cin, lambda m: m["files"]["unet.onnx"].update(size=10 ** 15))
    _one_line_error(_run(["inspect", cin]), "unet.onnx does not match")


def test_8_inspect_json_never_prints_nan(cin):
    _edit_manifest(cin, lambda m: m["stages"]["export"]["validation"]["unet"].update(worst_abs_error=float("nan")))
    rc, out, err = _run(["inspect", cin, "--json"])
    assert rc == 0, err
    info = _strict_json(out)
    assert info["export"]["validation"]["unet"]["worst_abs_error"] is None


@pytest.mark.parametrize("margin", ["nan", "inf", "0", "-1"])
def test_8_margin_must_be_finite_and_positive(cin, margin):
    with Bundle.transaction(cin) as w:
        w.write_json("calib/correction.json", {"precisions": {}})
    _one_line_error(_run(["plan", cin, "--criterion", "snr", "--margin", margin]), "--margin")


def test_8_random_bytes_as_a_checkpoint(tmp_path):
    from ptqd.models.tiny import tiny_cin_config

    p = tmp_path / "random.ckpt"
    p.write_bytes(np.random.RandomState(0).bytes(4096))
    p.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_cin_config()))
    line = _one_line_error(_run(["export", p, "--out", tmp_path / "b"]), "is not a PyTorch checkpoint")
    assert "arbitrary Python objects" not in line


def test_8_a_file_given_as_the_bundle(tmp_path):
    (tmp_path / "b.txt").write_text("x")
    _one_line_error(_run(["inspect", tmp_path / "b.txt"]), "is a file, not a bundle")


@pytest.mark.parametrize("edit,needle", [
    (lambda p: p.update(my_option=1), "my_option"),
    (lambda p: p.update(given_betas=[0.1] * 1000), "given_betas"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(give_pre_end=True), "give_pre_end"),
    (lambda p: p["cond_stage_config"]["params"].update(vocab=3), "vocab"),
])
def test_8_unknown_keys_outside_unet_config_are_refused(tiny_cin_ckpt, tmp_path, edit, needle):
    cfg = _config_variant(tiny_cin_ckpt, tmp_path, edit)
    _one_line_error(_run(["export", tiny_cin_ckpt, "--config", cfg, "--out", tmp_path / "b"]), needle)


def test_8_huge_num_fails_before_allocating(cin, monkeypatch):
    import ptqd.validate

    t0 = time.perf_counter()
    _one_line_error(_run(["sample", cin, "--num", "10000000000"]), "--num")
    assert time.perf_counter() - t0 < 3
    monkeypatch.setattr(ptqd.validate.os, "sysconf", lambda name: 1024)  # a machine with 1 MB of memory
    _one_line_error(_run(["sample", cin, "--num", "2000", "--steps", "1"]), "memory")


@pytest.mark.parametrize("argv", [["sample", "B", "--steps", "x"], ["sample"], ["bogus"], ["sample", "B", "--nope"],
                                  ["sample", "B", "--correction", "maybe"]])
def test_8_argparse_errors_are_one_line_exit_1(cin, argv):
    line = _one_line_error(_run([str(cin) if a == "B" else a for a in argv]))
    assert "--help" in line


# ---- fuzzing ----------------------------------------------------------------------------------------
FUZZ_VALUES = [None, True, False, 0, -1, 1, 3, 2 ** 63, -2 ** 40, 10 ** 400, 1e308, float("nan"), float("inf"),
               -float("inf"), 0.5, 1e-320, "", "abc", "1", "NaN", [], [1, "x"], [3, 8, 8], {}, {"a": 1}, "../x",
               "0" * 64]
MODEL_NUMBERS = [("schedule", "beta_start"), ("schedule", "beta_end"), ("schedule", "num_train_timesteps"),
                 ("scale_factor",), ("schedule", "kind"), ("conditioning", "null_class")]


def _paths(o, pre=()):
    yield pre
    if isinstance(o, dict):
        for k, v in o.items():
            yield from _paths(v, pre + (k,))
    elif isinstance(o, list):
        for i, v in enumerate(o):
            yield from _paths(v, pre + (i,))


def _mutate(m, rng, n_ops):
    m = copy.deepcopy(m)
    for _ in range(n_ops):
        spots = [p for p in _paths(m) if p]
        if not spots:
            break
        p = rng.choice(spots)
        parent = m
        for k in p[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            del parent[p[-1]]
        elif op < 0.25 and isinstance(parent, dict):
            parent[f"zz{rng.randint(0, 9)}"] = copy.deepcopy(rng.choice(FUZZ_VALUES))
        elif op < 0.35 and isinstance(parent[p[-1]], (int, float)) and not isinstance(parent[p[-1]], bool):
            parent[p[-1]] = parent[p[-1]] * rng.choice([-1, 0, 0.5, 2, 1e6, 1e300])
        else:
            parent[p[-1]] = copy.deepcopy(rng.choice(FUZZ_VALUES))
    return m


class _StubUNet(Runner):
    """A numpy stand-in for an engine (the Runner's input checks included): ε = 0.2·x + t/1000."""

    name = "stub"

    def infer(self, x, t, context):
        return (0.2 * x + (t / 1000.0)[:, None, None, None]).astype(np.float32)


def _check_images(images):
    assert np.isfinite(images).all(), "exit 0 with NaN in the output"
    assert all(np.ptp(im) > 0 for im in images), "exit 0 with a constant image"


def test_fuzz_500_mutated_manifests(tiny_cin_bundle, tmp_path):
    """Every mutation is refused on one line or accepted; accepted model facts sample to finite, varied images."""
    from ptqd.runtime.pipeline import sample_latents, to_uint8
    from ptqd.runtime.sampler import SamplerConfig

    src = Bundle.open(tiny_cin_bundle)
    d = tmp_path / "fz.bundle"  # the tiny bundle's manifest and small files (no 4 MB graph to hash each time)
    with Bundle.transaction(d, create=True) as w:
        for rel in ("unet.layers.json", "cond/class_embedding.npy", "reports/export_validation.json"):
            w.write_bytes(rel, src.read_bytes(rel))
        w.set_model(src.manifest["model"])
        w.set_stage("export", src.manifest["stages"]["export"])
        w.set_stage("calibrate", {"config": {"samples": 8, "steps": 10, "eta": 0.0, "guidance": 3.0},
                                  "buckets": [{"steps": list(range(10)), "t_range": [1, 901]}]})
    base = json.loads((d / MANIFEST).read_text())
    rng = random.Random(15)
    outcomes = {0: 0, 1: 0}
    sampled = 0
    full = tmp_path / "full.bundle"
    shutil.copytree(tiny_cin_bundle, full)
    real_runs = 0
    t0 = time.perf_counter()
    for i in range(500):
        if i % 3 == 0:  # aim at the model facts, where a bad value would turn into bad images
            m = copy.deepcopy(base)
            path = rng.choice(MODEL_NUMBERS)
            parent = m["model"]
            for k in path[:-1]:
                parent = parent[k]
            parent[path[-1]] = rng.choice(FUZZ_VALUES + [0.9, 1e-9, 2, 1000, 0.02, "cosine", "linear", 999])
        else:
            m = _mutate(base, rng, rng.choice([1, 1, 2, 3]))
        (d / MANIFEST).write_text(json.dumps(m))
        for argv in (["inspect", d, "--json"], ["inspect", d]):
            rc, out, err = _run(argv)
            assert rc in (0, 1), (i, rc, err[-2000:])
            outcomes[rc] += 1
            if rc == 1:
                _one_line_error((rc, out, err))
            elif argv[-1] == "--json":
                _strict_json(out)
        try:
            facts = Bundle.open(d).facts
        except UserError:
            continue
        # accepted facts: the sampler's numerics stay finite (numpy, a stub engine: no ONNX session)
        table = np.random.RandomState(0).standard_normal(
            (facts.conditioning.num_classes or 1, facts.conditioning.context_dim or 1)).astype(np.float32)
        labels = np.arange(2) % max(1, (facts.conditioning.num_classes or 2) - 1)
        guidance = 3.0 if facts.conditioning.kind == "class" else 1.0
        lat = sample_latents(_StubUNet(), facts, table, labels, np.arange(2), 0, SamplerConfig(3, 0.0, guidance))
        _check_images(to_uint8(np.tanh(lat / facts.scale_factor)))
        sampled += 1
        if i % 3 == 0 and real_runs < 8:  # and through the real CLI, engine and decoder
            (full / MANIFEST).write_text(json.dumps({**json.loads((tiny_cin_bundle / MANIFEST).read_text()),
                                                     "model": m["model"]}))
            rc, _, err = _run(["sample", full, "--num", "2", "--steps", "2", "--out", tmp_path / "s.npz"])
            if rc == 0:
                _check_images(np.load(tmp_path / "s.npz")["images"])
                real_runs += 1
            else:
                _one_line_error((rc, "", err))
    assert outcomes[0] > 100 and outcomes[1] > 100 and sampled > 50 and real_runs >= 3, (outcomes, sampled, real_runs)
    assert time.perf_counter() - t0 < 30


def test_fuzz_200_mutated_cli_argument_sets(cin, tmp_path, monkeypatch):
    """Never a traceback, never exit 2; every exit-0 sample run gives finite, non-constant images."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "afile").write_text("x")
    pf = out / "plan.json"
    pf.write_text(json.dumps({"steps": [{"t": 901, "precision": "fp32"}]}))
    values = ["nan", "inf", "-inf", "-1", "0", "1", "2", "1e3", "999999999999", "10000000000", "abc", "",
              "0.5", "1e308", "-0", "99", str(out / "afile"), str(out / "afile" / "x.png"), str(out / "new" / "x.npz"),
              str(out), str(pf), "x.jpg", "auto", "w4a4", "fp32", "on", "off", "0,1", "99", ",", "1,,2", "--seed"]
    bases = {
        "sample": ["sample", cin, "--num", "2", "--steps", "2", "--seed", "0", "--eta", "0.5", "--guidance", "2",
                   "--batch", "1", "--classes", "1,2", "--plan", "fp32", "--correction", "auto",
                   "--out", out / "s.npz"],
        "inspect": ["inspect", cin, "--json"],
        "plan": ["plan", cin, "--margin", "1", "--budget", "0.9", "--criterion", "snr"],
        "correct": ["correct", cin, "--samples", "4", "--holdout", "1", "--margin", "1"],
        "build": ["build", cin, "--precisions", "w8a8"],
        "eval": ["eval", cin, "--num", "1", "--steps", "1", "--seed", "0", "--guidance", "2"],
    }
    seen = []
    real_sample = api.sample

    def spy(*a, **k):
        images, labels = real_sample(*a, **k)
        seen.append(images)
        return images, labels

    monkeypatch.setattr(api, "sample", spy)
    valid = {"--num": ["1", "3"], "--steps": ["1", "3", "5"], "--seed": ["0", "7", "123456789012"],
             "--eta": ["0", "1", "0.3"], "--guidance": ["0", "1", "7.5"], "--batch": ["1", "2", "64"],
             "--classes": ["0", "1,2,3", "9", ""], "--plan": ["fp32", str(pf)], "--correction": ["auto", "off", "on"],
             "--out": [str(out / "s.npz"), str(out / "new" / "x.npz"), str(out / "g.png")]}
    rng = random.Random(15)
    ok_samples = 0
    t0 = time.perf_counter()
    for i in range(200):
        verb = rng.choice(["sample"] * 6 + list(bases))
        argv = [str(a) for a in bases[verb]]
        for _ in range(rng.choice([1, 1, 2])):
            op = rng.random()
            if op < 0.6:  # a flag's value: a valid alternative, or anything
                j = rng.randrange(3, len(argv), 2) if len(argv) > 3 else 1
                flag = argv[j - 1]
                argv[j] = rng.choice(valid[flag]) if flag in valid and rng.random() < 0.5 else rng.choice(values)
            elif op < 0.7:
                argv[1] = rng.choice(values)
            elif op < 0.8 and len(argv) > 2:
                del argv[rng.randrange(2, len(argv))]
            elif op < 0.9:
                argv.insert(rng.randrange(1, len(argv) + 1), rng.choice(["--bogus", "--num", "-x", "--steps"]))
            else:
                argv[rng.randrange(2, len(argv), 2) if len(argv) > 2 else 1] = rng.choice(values + ["--num"])
        seen.clear()
        rc, _, err = _run(argv)
        assert rc in (0, 1), (i, argv, rc, err[-3000:])
        if rc == 1:
            _one_line_error((rc, "", err))
        elif seen:
            _check_images(seen[-1])
            ok_samples += 1
    assert ok_samples >= 10, ok_samples
    assert time.perf_counter() - t0 < 30


@pytest.mark.parametrize("kind", [str, Path, "bundle"])
def test_a_stage_locks_its_own_bundle_whatever_the_path_type(tmp_path, kind):
    """A Path's ``.root`` is "/": a stage given a Path once locked "/..lock", so two writers of one bundle
    did not exclude each other (and writers of different bundles did)."""
    from ptqd.bundle import writes_bundle
    from ptqd.bundle.lock import bundle_lock

    from tests.conftest import make_bundle

    b = make_bundle(tmp_path / "b.bundle")
    other = make_bundle(tmp_path / "other.bundle")
    seen = {}

    @writes_bundle()
    def stage(bundle):
        with bundle_lock(b.root, blocking=False) as free:  # this thread's own writer holds it: not free
            seen["own"] = free
        with bundle_lock(other.root, blocking=False) as free:  # another bundle's lock is not taken
            seen["other"] = free

    stage(b if kind == "bundle" else kind(tmp_path / "b.bundle"))
    assert seen == {"own": False, "other": True}
