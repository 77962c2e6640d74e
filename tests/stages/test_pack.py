"""`ptqd pack`: a deployable bundle with only what sampling needs, which samples exactly like the full one
and refuses, in one line, what needs the rest."""

import numpy as np
import pytest

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.cli import main
from ptqd.errors import BundleError, UserError


def _sample(bundle, plan):
    images, _ = api.sample(bundle, num=6, steps=10, eta=1.0, precision=plan, progress=False)
    return images


def test_packed_plan_samples_like_the_full_bundle(compiled, tmp_path):
    src = compiled[0]
    out = tmp_path / "plan.bundle"
    r = api.pack(src, out)
    b = Bundle.open(out)
    b.verify_all()
    plan_precisions = sorted({s["precision"] for s in Bundle.open(src).read_json("calib/plan.json")["steps"]})
    assert r["precisions"] == plan_precisions and b.stage("pack")["plan"] == "auto"
    files = set(b.files)
    assert {"calib/plan.json", "calib/correction.json", "first_stage.onnx", "cond/class_embedding.npy"} <= files
    assert {f"engines/onnxruntime/{p}.onnx" for p in plan_precisions} <= files
    assert not any(f.endswith(".qdq.onnx") or f.startswith("unet.onnx") or f.startswith("calib/w") for f in files)
    assert "calib/feeds.npz" not in files and set(b.read_json("engines/onnxruntime/build.json")) == set(plan_precisions)
    assert r["size_bytes"] < r["source_size_bytes"] / 3
    np.testing.assert_array_equal(_sample(out, "auto"), _sample(src, "auto"))


def test_packed_precision_samples_like_the_full_bundle_and_refuses_the_rest(compiled, tmp_path, capsys):
    src = compiled[0]
    out = tmp_path / "w4a8.bundle"
    assert main(["pack", str(src), "--plan", "w4a8", "--out", str(out)]) == 0
    assert "w4a8 (w4a8) on onnxruntime" in capsys.readouterr().out
    np.testing.assert_array_equal(_sample(out, "w4a8"), _sample(src, "w4a8"))
    with pytest.raises(BundleError, match=f"packed bundle .* --plan w4a8; run anything else on the full bundle {src}"):
        _sample(out, "fp32")
    for argv in (["calibrate", str(out)], ["sample", str(out), "--plan", "w4a4", "--num", "2"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("packed bundle" in err[0] or "no w4a4 engine" in err[0]), err


def test_pack_errors(compiled, tmp_path):
    src = compiled[0]
    with pytest.raises(UserError, match="unknown --plan"):
        api.pack(src, tmp_path / "a", plan="w9a9")
    with pytest.raises(UserError, match="no w8a8 engine on tensorrt"):
        api.pack(src, tmp_path / "b", plan="w8a8", backend="tensorrt")
    with pytest.raises(UserError, match="new directory"):
        api.pack(src, src, plan="w8a8")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    fp = api.pack(src, tmp_path / "fp", plan="fp32")  # fp32: the exported graph itself
    assert "unet.onnx" in Bundle.open(tmp_path / "fp").files and fp["precisions"] == ["fp32"]
