"""The command line: every bad input gets one line on stderr and exit code 1, never a traceback."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

from ptqd.models.tiny import compvis_state_dict, tiny_cin_config


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "ptqd.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def assert_one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ptqd: error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _ckpt(tmp_path, state, cfg=None, name="m.ckpt"):
    p = tmp_path / name
    torch.save({"state_dict": state}, p)
    p.with_suffix(".yaml").write_text(yaml.safe_dump(cfg or tiny_cin_config()))
    return p


def test_export_and_inspect(tiny_cin_ckpt, tmp_path):
    out = tmp_path / "b"
    r = run("export", tiny_cin_ckpt, "--out", out, "--no-first-stage")
    assert r.returncode == 0, r.stderr
    assert "max|onnx-torch|" in r.stdout
    r = run("inspect", out)
    assert r.returncode == 0 and "MACs/fwd" in r.stdout and "checksums verified" in r.stdout
    info = json.loads(run("inspect", out, "--json").stdout)
    assert info["macs_per_forward"] == sum(info["macs_by_kind"].values()) > 0
    assert set(info["macs_by_kind"]) == {"conv", "linear", "attention"}
    assert info["layer_count"]["conv"] > 0 and info["files"]["unet.onnx"] > 0


def test_missing_file(tmp_path):
    assert_one_line_error(run("export", tmp_path / "nope.ckpt", "--out", tmp_path / "b"), "not found")
    assert_one_line_error(run("inspect", tmp_path / "nope"), "bundle not found")


def test_unexpected_and_missing_keys(tmp_path):
    state = compvis_state_dict(tiny_cin_config())
    state["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    del state["model.diffusion_model.out.0.weight"]
    r = run("export", _ckpt(tmp_path, state), "--out", tmp_path / "b")
    assert_one_line_error(r, "missing key(s): out.0.weight", "unexpected key(s): bogus.weight")
    assert not (tmp_path / "b").exists()


def test_config_mismatch(tmp_path):
    p = _ckpt(tmp_path, compvis_state_dict(tiny_cin_config()), tiny_cin_config(channel_mult=(1, 3)))
    assert_one_line_error(run("export", p, "--out", tmp_path / "b"), "do not match the config")


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    p = tmp_path / "evil.ckpt"
    p.write_bytes(pickle.dumps({"state_dict": {"w": Evil()}}))
    p.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_cin_config()))
    assert_one_line_error(run("export", p, "--out", tmp_path / "b"), "refused")
    assert not (tmp_path / "pwned").exists()


def _bundle(tiny_cin_bundle, tmp_path):
    import shutil

    d = tmp_path / "copy.bundle"
    shutil.copytree(tiny_cin_bundle, d)
    return d


def _edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_tampered_bundle(tiny_cin_bundle, tmp_path):
    d = _bundle(tiny_cin_bundle, tmp_path)
    with open(d / "unet.onnx", "r+b") as f:
        f.seek(-64, 2)
        f.write(b"\x00" * 8)
    assert_one_line_error(run("inspect", d), "unet.onnx does not match its checksum")


def test_manifest_path_with_dotdot(tiny_cin_bundle, tmp_path):
    d = _bundle(tiny_cin_bundle, tmp_path)
    _edit(d, lambda m: m["files"].__setitem__("../../etc/passwd", {"sha256": "0" * 64, "size": 0}))
    assert_one_line_error(run("inspect", d), "escapes the bundle")


def test_unknown_schema_version(tiny_cin_bundle, tmp_path):
    d = _bundle(tiny_cin_bundle, tmp_path)
    _edit(d, lambda m: m.__setitem__("schema_version", 99))
    assert_one_line_error(run("inspect", d), "schema_version 99 is newer")


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "inspect", tmp_path / "nope")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_help_teaches():
    r = run("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "export" in r.stdout
    r = run("export", "--help")
    assert "--config" in r.stdout and "--schedule" in r.stdout


def test_build_tensorrt_without_tensorrt_is_one_line(tiny_cin_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert_one_line_error(run("build", tiny_cin_bundle, "--backend", "tensorrt"), "pip install")


def test_lint_tensorrt_passes_on_the_demo_and_names_the_rule_on_an_ort_graph(compiled, tmp_path, capsys):
    import shutil

    from ptqd.bundle import Bundle
    from ptqd.cli import main

    bundle = compiled[0]
    assert main(["lint", str(bundle), "--target", "tensorrt"]) == 0
    lines = {ln.split()[0]: ln.split()[-1] for ln in capsys.readouterr().out.splitlines() if ln.strip()}
    assert {p: lines.get(p) for p in ("fp16", "w8a8", "w4a8", "w4a4")} == dict.fromkeys(("fp16", "w8a8", "w4a8",
                                                                                        "w4a4"), "ok")
    bad = tmp_path / "bad.bundle"
    shutil.copytree(bundle, bad)
    with Bundle.transaction(bad) as w:  # an ONNX Runtime graph where a TensorRT one belongs
        shutil.copyfile(Bundle.open(bad).path("engines/onnxruntime/w8a8.qdq.onnx"),
                        w.file("engines/tensorrt/w8a8.qdq.onnx"))
    assert main(["lint", str(bad)]) == 1
    res = capsys.readouterr()
    assert "zero-point" in res.out and "rule violation" in res.err


@pytest.mark.parametrize("precisions,note", [(["w4a8", "w4a4", "w4a4"], True), (["w4a8", "w8a8"], False)])
def test_plan_says_its_w4a4_steps_save_bops_not_time(monkeypatch, capsys, precisions, note):
    import argparse

    from ptqd import api
    from ptqd.cli import commands

    steps = [{"t": 951 - 50 * i, "precision": p} for i, p in enumerate(precisions)]
    monkeypatch.setattr(api, "plan", lambda *a, **k: {"criterion": "sensitivity", "steps": steps})
    commands.cmd_plan(argparse.Namespace(bundle="b", margin=1.0, criterion="sensitivity", budget=0.9,
                                         reference="w4a8", preset="auto"))
    out = capsys.readouterr().out
    assert "t=901:w4a4" in out if note else "t=901:w8a8" in out
    assert ("w4a4 steps save BOPs, not time" in out) is note
