"""The float parts of ptqd's OpenVINO engines in bf16 where the CPU computes it natively: chosen by the build
only when the engine stays as close to FP32 as its validated f32 run, recorded, and never run as bf16 on a CPU
without native bf16 (there the engine computes the f32 numerics it was validated in)."""

import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")


def _native(monkeypatch, yes: bool):
    import ptqd.resources

    monkeypatch.setattr(ptqd.resources, "has_native_bf16", lambda isa=None: yes)


def test_the_choice_follows_the_request_and_the_cpu(monkeypatch):
    from ptqd.errors import UserError
    from ptqd.stages.build_openvino import float_choice

    _native(monkeypatch, True)
    assert float_choice("auto")[0] == "bf16" and float_choice("bf16")[0] == "bf16"
    assert float_choice("f32") == ("f32", "asked for (--float-precision f32)")
    _native(monkeypatch, False)
    for asked in ("auto", "bf16"):
        fp, why = float_choice(asked)
        assert fp == "f32" and "no native bf16" in why and "CPUs" in why  # names this CPU
    with pytest.raises(UserError, match="choose from auto, bf16, f32"):
        float_choice("fp16")


def test_the_check_compares_the_bf16_run_with_the_f32_run_against_fp32():
    from ptqd.stages.build_openvino import check_bf16, float_parts

    rng = np.random.RandomState(0)
    inputs = [{"x": rng.randn(1, 4, 8, 8).astype(np.float32), "t": np.array([1.0], np.float32)} for _ in range(4)]
    fp = lambda x, t, c: x * 2  # noqa: E731
    f32 = lambda x, t, c: x * 2 + 0.01 * np.sign(x)  # noqa: E731 - 0.5 % from FP32
    close = lambda: lambda x, t, c: x * 2 + 0.011 * np.sign(x)  # noqa: E731 - 10 % further: inside the 1.25x slack
    far = lambda: lambda x, t, c: x * 2 + 0.02 * np.sign(x)  # noqa: E731 - twice as far
    ok, bad = check_bf16(f32, close, fp, inputs), check_bf16(f32, far, fp, inputs)
    assert ok["passed"] and not bad["passed"] and ok["inputs"] == 4
    assert bad["bf16_vs_fp32_median"] == pytest.approx(2 * bad["f32_vs_fp32_median"], rel=1e-3)
    assert bad["bf16_vs_f32_median"] == pytest.approx(bad["f32_vs_fp32_median"], rel=1e-2)  # vs another norm
    # the record: bf16 only if every bucket passed, unless bf16 was asked for by name
    assert float_parts("bf16", "native", "auto", [{"bf16_check": ok}, {"bf16_check": ok}])["float_precision"] == "bf16"
    rec = float_parts("bf16", "native", "auto", [{"bf16_check": ok}, {"bf16_check": bad}])
    assert rec["float_precision"] == "f32" and "moved the engine away from FP32" in rec["float_precision_why"]
    assert float_parts("bf16", "native", "bf16", [{"bf16_check": bad}])["float_precision"] == "bf16"
    assert "not checked" in float_parts("bf16", "native", "auto", [{}])["float_precision_why"]
    assert float_parts("f32", "asked for", "f32", [{}]) == {"float_precision": "f32", "float_precision_why": "asked for"}


def test_a_bf16_record_runs_in_f32_on_a_cpu_without_native_bf16(compiled, tmp_path, monkeypatch):
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.engines.openvino import float_precision_here
    from ptqd.facts import seeded_unet_inputs

    out = tmp_path / "demo.bundle"
    shutil.copytree(compiled[0], out)
    _native(monkeypatch, True)  # builds (and checks) bf16 wherever the test runs
    rec = api.build(out, backend="openvino", precisions=("w8a8",), progress=False)["w8a8"]
    check = rec["buckets"][0]["bf16_check"]
    assert rec["float_precision"] == ("bf16" if check["passed"] else "f32")
    assert check["inputs"] > 0 and check["bf16_vs_fp32_median"] > 0
    assert f"float parts in {rec['float_precision']}" in rec["numerics"]
    b = Bundle.open(out)
    f = seeded_unet_inputs(b.facts, 2, 501.0, 0)
    args = (f["x"], f["t"], f.get("context"))
    runner = api.open_engine(b, "w8a8", backend="openvino")
    assert runner.float_precision == rec["float_precision"]
    assert runner.config["INFERENCE_PRECISION_HINT"] == rec["float_precision"]
    _native(monkeypatch, False)  # the same bundle on a CPU without native bf16: the validated f32 numerics
    assert float_precision_here("bf16") == "f32"
    f32 = api.open_engine(b, "w8a8", backend="openvino")
    assert f32.config["INFERENCE_PRECISION_HINT"] == "f32"
    exact = api.build(tmp_path / "demo.bundle", backend="openvino", precisions=("w8a8",), progress=False,
                      float_precision="f32")["w8a8"]  # asked for f32: no bf16 check, the fake-quant numerics
    assert exact["float_precision"] == "f32" and "bf16_check" not in exact["buckets"][0]
    v = exact["validation_vs_fake_quant"]
    assert v["passed"] and "bf16" not in v.get("verdict", "")  # validated in f32, as every engine is
    np.testing.assert_allclose(f32(*args), api.open_engine(b, "w8a8", backend="openvino")(*args), rtol=0, atol=0)


def test_cli_build_prints_the_float_precision_and_its_reason(compiled, tmp_path, capsys):
    from ptqd.cli import main

    out = tmp_path / "demo.bundle"
    shutil.copytree(compiled[0], out)
    assert main(["build", str(out), "--backend", "openvino", "--precisions", "w4a8", "--float-precision", "f32"]) == 0
    assert "w4a8: float parts in f32 (asked for (--float-precision f32))" in capsys.readouterr().out
