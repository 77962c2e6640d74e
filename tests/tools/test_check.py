"""`ptqd check` (the CI regression gate), `ptqd bench` and `ptqd report` on a compiled demo bundle."""

import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from ptqd.bundle import Bundle
from ptqd.cli import main


@pytest.fixture(scope="module")
def gated(compiled, tmp_path_factory):
    """A copy of the compiled bundle with a fresh baseline (small: 8 samples, 10 steps)."""
    out = tmp_path_factory.mktemp("chk") / "demo.bundle"
    shutil.copytree(compiled[0], out)
    from ptqd.tools.check import check

    check(out, update=True, num=8, steps=10)
    return out


def test_check_passes_on_a_fresh_bundle_and_writes_junit(gated, tmp_path, capsys):
    junit = tmp_path / "check.xml"
    assert main(["check", str(gated), "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert "passed:" in out and "REGRESSION" not in out
    suite = ET.parse(junit).getroot().find("testsuite")
    assert int(suite.get("failures")) == 0 and int(suite.get("tests")) > 10
    names = {(c.get("classname"), c.get("name")) for c in suite.iter("testcase")}
    assert ("ptqd.check.w8a8", "eps drift (rel-L2)") in names and ("ptqd.check.auto", "PSNR vs FP (dB)") in names


def test_check_fails_when_an_engine_is_swapped_for_a_worse_one(gated, tmp_path, capsys):
    bad = tmp_path / "swapped.bundle"
    shutil.copytree(gated, bad)
    with Bundle.transaction(bad) as w:  # the w4a4 engine copied over w8a8, manifest updated
        w.write_bytes("engines/onnxruntime/w8a8.onnx", (bad / "engines/onnxruntime/w4a4.onnx").read_bytes())
    Bundle.open(bad).verify_all()
    junit = tmp_path / "j.xml"
    assert main(["check", str(bad), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "REGRESSION" in ln]
    assert lines and all(ln.startswith("w8a8") for ln in lines), out
    assert any("eps drift" in ln for ln in lines)
    fails = [c for c in ET.parse(junit).getroot().iter("testcase") if c.find("failure") is not None]
    assert fails and all(c.get("classname") == "ptqd.check.w8a8" for c in fails)


def test_check_fails_when_the_baseline_is_tightened(gated, tmp_path, capsys):
    base = tmp_path / "tight.json"
    from ptqd.tools.check import check

    check(gated, baseline=base, update=True, num=8, steps=10)
    assert main(["check", str(gated), "--baseline", str(base)]) == 0
    meta = json.loads(base.read_text())
    meta["engines"]["w4a8"]["values"]["psnr_vs_fp"] += 3.0  # a bar the engine does not reach
    base.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["check", str(gated), "--baseline", str(base)]) == 1
    out = capsys.readouterr().out
    assert [ln.split()[0] for ln in out.splitlines() if "REGRESSION" in ln] == ["w4a8"]


def test_check_without_baseline_or_with_tampered_arrays_is_a_clear_error(compiled, gated, tmp_path, capsys):
    assert main(["check", str(compiled[0])]) == 1
    assert "--update" in capsys.readouterr().err
    base = tmp_path / "b.json"
    from ptqd.tools.check import check

    check(gated, baseline=base, update=True, num=4, steps=10)
    base.with_suffix(".npz").write_bytes(b"not the arrays")
    assert main(["check", str(gated), "--baseline", str(base)]) == 1
    assert "checksum" in capsys.readouterr().err


def test_bench_reports_every_engine_peers_and_runtime_overhead(compiled):
    from ptqd.tools.bench import bench

    res = bench(compiled[0], runs=10, warmup=1, large_batch=8, e2e_images=2, steps=4, memory=False)
    eng = res["engines"]
    assert {"fp32", "torch-fp32", "ort-int8", "w8a8", "w4a8", "w4a4"} <= set(eng)
    for p in ("fp32", "w8a8", "torch-fp32"):
        lat = eng[p]["latency"]
        assert set(lat) == {"1", "2", "8"} and lat["2"]["runs"] >= 10
        assert lat["2"]["min_ms"] <= lat["2"]["median_ms"] and lat["8"]["gflops"] > 0
    assert eng["fp32"]["latency"]["2"]["speedup_vs_ort_fp32"] == 1.0
    s = res["sampling"]
    assert {"fp32", "w8a8+ptqd", "plan+ptqd"} <= set(s)
    for r in s.values():
        total = r["engine_share"] + r["decoder_share"] + r["runtime_overhead_share"]
        assert total == pytest.approx(1.0) and 0 <= r["runtime_overhead_share"] < 1
        assert r["engine_calls"] == 4  # the median run's
    plan = json.loads((compiled[0] / "calib/plan.json").read_text())["steps"]
    ts = [901, 601, 301, 1]  # the 4-step schedule, read through the 10-step plan (nearest t)
    assert s["plan+ptqd"]["engine_switches"] >= 0 and len(plan) == 10 and len(ts) == 4


def test_bench_measures_peak_memory_in_a_fresh_process(compiled):
    from ptqd.tools.bench import peak_rss_mb

    base = peak_rss_mb(compiled[0], [])
    one = peak_rss_mb(compiled[0], ["w8a8"])
    three = peak_rss_mb(compiled[0], ["w8a8", "w4a8", "w4a4"])
    assert 0 < base <= one <= three


def test_report_writes_grids_plots_and_index(compiled, tmp_path):
    from ptqd.tools.report import report

    out = tmp_path / "r.bundle"
    shutil.copytree(compiled[0], out)
    res = report(out, num=4)
    assert {"reports/samples_side_by_side.png", "reports/correction.png", "reports/plan.png",
            "reports/index.md"} <= set(res["files"])
    b = Bundle.open(out)
    for f in res["files"]:
        data = b.path(f).read_bytes()
        assert len(data) > 100
        if f.endswith(".png"):
            assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    im = Image.open(b.path("reports/samples_side_by_side.png"))
    assert im.height > 5 * 64  # fp32, ort-int8, w4a4, w4a8, w8a8, plan: one row each
    assert "plan+ptqd" in b.path("reports/index.md").read_text()
