"""The demo model: training is reproducible in code, the shipped weights load, the README's commands run."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_train_demo_smoke_writes_a_loadable_compvis_checkpoint(tmp_path):
    from ptqd.models.compvis import load_compvis
    from ptqd.models.demo import train_demo

    log = train_demo(tmp_path, ae_steps=2, unet_steps=2, clf_steps=2, batch=8, ae_batch=4, progress=False)
    assert {p.name for p in tmp_path.iterdir()} >= {"demo_ldm.safetensors", "demo_ldm.yaml", "digit_classifier.onnx",
                                                    "training.json"}
    m = load_compvis(tmp_path / "demo_ldm.safetensors", tmp_path / "demo_ldm.yaml")
    assert m.facts.latent_shape == (3, 8, 8) and m.facts.image_shape == (1, 32, 32)
    assert m.facts.conditioning.null_class == 10 and log["held_out_images"] == 360


def test_digits_split_is_stratified_and_held_out():
    from ptqd.models.demo import digits

    xtr, ytr, xte, yte = digits()
    assert xtr.shape[1:] == (1, 32, 32) and len(xtr) + len(xte) == 1797
    assert np.bincount(yte).tolist() == [36] * 10
    assert -1.0 <= xtr.min() and xtr.max() <= 1.0
    # no held-out image appears in the training split
    tr = {x.tobytes() for x in xtr}
    assert sum(x.tobytes() in tr for x in xte) < 5  # the digits set has a few exact duplicates


def test_shipped_demo_bundle_samples_recognisable_digits(tmp_path):
    from ptqd import api

    api.export("demo", tmp_path / "d.bundle", progress=False)
    rep = api.evaluate(tmp_path / "d.bundle", num=60, steps=20, progress=False, write_report=False)
    row = rep["rows"][0]
    assert row["class_acc"] >= 0.8, row
    assert rep["reference"]["classifier_acc_held_out"] >= 0.95


def readme_commands():
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_has_two_commands_and_ci_runs_the_test_command():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "ptqd demo" in cmds[0] and "pytest" in cmds[1]
    assert cmds[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_main_command_runs(tmp_path):
    cmd = readme_commands()[0].replace("ptqd demo", f"ptqd demo --out {tmp_path / 'out'}")
    r = subprocess.run(cmd, shell=True, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "class acc" in r.stdout and (tmp_path / "out" / "samples.png").exists()
    import importlib.util

    if importlib.util.find_spec("openvino") is not None:  # setup.sh installs it: the demo shows its engines' speed
        assert "OpenVINO backend (" in r.stdout
