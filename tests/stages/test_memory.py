"""Memory: the whole-tree peak, the check before a stage starts (refuse or adapt in one line), the ort-int8
peer in bounded memory with unchanged ranges, and a compile killed with signal 9 that resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ptqd import api, memory
from ptqd.bundle import Bundle, layout
from ptqd.cli import main
from ptqd.errors import UserError
from ptqd.precision import PEER, Precision
from ptqd.resources import ENV_AVAILABLE, TreePeak, parse_size
from ptqd.stages.build import plan_precisions
from tests.conftest import SMALL_COMPILE

ROOT = Path(__file__).resolve().parents[2]


def test_parse_size():
    assert parse_size("6G") == 6 << 30 and parse_size("800M") == 800 << 20 and parse_size("1.5GiB") == 3 << 29
    assert parse_size("123") == 123
    with pytest.raises(ValueError, match="6G"):
        parse_size("lots")


def test_tree_peak_sees_a_child_process():
    """A child that holds 300 MB for half a second shows in the parent's tree peak (not in its own VmHWM)."""
    code = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"
    with TreePeak() as alone:
        time.sleep(0.2)
    with TreePeak() as watch:
        subprocess.run([sys.executable, "-c", code], check=True)
    assert watch.peak_bytes - alone.peak_bytes > 250 << 20


def test_nested_windows_keep_the_outer_peak():
    """A stage's window resets the process's high-water mark; the whole compile's window still has it."""
    with TreePeak(interval=60) as outer:  # each window polls once, at its start: only VmHWM sees the spike
        with TreePeak(interval=60) as inner:
            time.sleep(0.3)  # both pollers are past their one poll
            b = bytearray(400 << 20)
            b[::4096] = b"x" * len(b[::4096])
            del b
        with TreePeak(interval=60):
            pass
    assert inner.peak_bytes > 400 << 20 and outer.peak_bytes > 400 << 20


def test_compile_refuses_in_seconds_when_memory_is_short(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_AVAILABLE, "300M")
    out = tmp_path / "d.bundle"
    t0 = time.perf_counter()
    assert main(["compile", "demo", "--out", str(out)]) == 1
    assert time.perf_counter() - t0 < 10
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ptqd: error: export needs about ")
    assert f"0.3 GiB is available ({ENV_AVAILABLE}=300M)" in err[0]
    # nothing half-written, no staging folder; only the (empty, reusable) lock file of the bundle's writers
    assert [p.name for p in tmp_path.iterdir()] == [".d.bundle.lock"]


def test_a_bad_memory_override_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV_AVAILABLE, "plenty")
    assert main(["compile", "demo", "--out", str(tmp_path / "d.bundle")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ENV_AVAILABLE in err[0] and "6G" in err[0]


def test_stages_refuse_naming_the_flag_that_makes_them_fit(compiled, monkeypatch, tmp_path):
    copy = tmp_path / "m.bundle"  # a stage that failed to refuse would rewrite the shared bundle
    shutil.copytree(compiled[0], copy)
    b = Bundle.open(copy)
    cost = memory.ModelCost.from_bundle(b)
    assert cost.weight_bytes == sum(r["size"] for k, r in b.files.items() if k.startswith("unet.onnx"))
    monkeypatch.setenv(ENV_AVAILABLE, str(memory.BASE))
    with pytest.raises(UserError, match="calibrate needs about .* --preset minimal"):
        api.calibrate(copy, progress=False)
    with pytest.raises(UserError, match="correct needs about"):
        api.correct(copy, progress=False)
    with pytest.raises(UserError, match="build needs about"):
        api.build(copy, precisions=("w8a8",), progress=False)


def test_the_peer_is_left_out_in_one_line_where_only_it_does_not_fit(compiled, monkeypatch):
    b = Bundle.open(compiled[0])
    cost = memory.ModelCost.from_bundle(b)
    fits, peer_min = memory.build_peak(cost), memory.peer_peak(cost, 1)
    assert peer_min > fits  # the peer's one item costs more than ptqd's engines: there is room between them
    monkeypatch.setenv(ENV_AVAILABLE, str((fits + peer_min) // 2))
    lines = []
    kept, _ = plan_precisions(b, (Precision.W8A8, PEER), lines.append)
    assert kept == (Precision.W8A8,) and len(lines) == 1
    assert "ort-int8" in lines[0] and "left out" in lines[0] and "--precisions ort-int8" in lines[0]
    with pytest.raises(UserError, match="ort-int8"):  # asked for alone: refused, not silently nothing
        plan_precisions(b, (PEER,), lines.append)
    monkeypatch.setenv(ENV_AVAILABLE, "64G")
    _, chunk = plan_precisions(b, (PEER,), lines.append)
    assert chunk == min(memory.MAX_PEER_CHUNK, (1 << 30) // int(memory.PEER_ACT_FACTOR * cost.act_bytes))
    monkeypatch.setenv(ENV_AVAILABLE, str(peer_min + 1))  # room for one item at a time, not more
    assert chunk > 1 and plan_precisions(b, (PEER,), lines.append)[1] == 1


def test_peer_ranges_do_not_depend_on_items_per_run(compiled, tmp_path):
    """quantize_static's MinMax over all items: batching them 3 or 16 at a time gives the same graph, but
    for the float rounding of the kernels at another batch size (~1 ulp in a few ranges)."""
    from ptqd.engines.onnxruntime import quantize_static_peer

    b = Bundle.open(compiled[0])
    feeds = {k: v[:16] for k, v in np.load(b.path(layout.CALIB_FEEDS)).items()}
    att = [r["name"] for r in layout.layer_rows(b) if r["kind"] == "attention"]
    graphs = []
    for chunk in (16, 3):
        out = tmp_path / f"q{chunk}.onnx"
        quantize_static_peer(b.path(layout.UNET_ONNX), out, feeds, att, chunk=chunk)
        graphs.append({i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer})
    assert graphs[0].keys() == graphs[1].keys()
    scales = [k for k in graphs[0] if k.endswith("_scale")]
    assert len(scales) > 20
    for k in graphs[0]:
        if k.endswith("_scale"):
            np.testing.assert_allclose(graphs[0][k], graphs[1][k], rtol=1e-6, err_msg=k)
        else:  # weights, zero points
            np.testing.assert_array_equal(graphs[0][k], graphs[1][k], err_msg=k)


def _build_record(out: Path):
    try:
        return (json.loads((out / "manifest.json").read_text()).get("stages") or {}).get("build")
    except (OSError, ValueError):  # between the two renames of a commit
        return None


def test_compile_killed_during_build_resumes_with_the_same_engines(compiled, tmp_path):
    src = compiled[0]
    def engines(b):  # every engine file but build.json (which records build times)
        return {rel: r["sha256"] for rel, r in b.files.items() if rel.startswith("engines/")
                and not rel.endswith("build.json")}

    want = engines(Bundle.open(src))
    assert len(want) >= 8
    out = tmp_path / "k.bundle"
    shutil.copytree(src, out)
    with Bundle.transaction(out) as w:  # as if the build had never run
        for rel in w.listed("engines/"):
            w.remove(rel)
        w.drop_stage("build")
    code = ("from ptqd import api; from tests.conftest import SMALL_COMPILE as S; "
            f"api.compile('demo', {str(out)!r}, progress=False, **S)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (_build_record(out) or {}).get("precisions"):  # the first engine committed
            assert proc.poll() is None, "the compile ended before its build committed anything"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    kept = _build_record(out)["precisions"]
    assert 1 <= len(kept) < 4, kept  # killed in the middle of the build
    log = []
    res = api.compile("demo", out, progress=False, log=log.append, **SMALL_COMPILE)
    assert res["stages"]["export"] == res["stages"]["calibrate"] == "reused"
    assert res["stages"]["build"] != "reused"
    line = next(m for m in log if m.startswith("build: ") and "kept from an earlier run" in m)
    assert sorted(line.split(": ", 1)[1].split(" kept")[0].split(", ")) == sorted(kept), (line, kept)
    b = Bundle.open(out)
    b.verify_all()
    assert b.stage("build")["precisions"] == ["ort-int8", "w4a4", "w4a8", "w8a8"]
    assert engines(b) == want  # the same engines, byte for byte, as the uninterrupted compile's
    # what the kill left beside the bundle: staging folders are gone; the lock file stays (its flock died with
    # the process) and is free
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    from ptqd.bundle.lock import bundle_lock

    with bundle_lock(out, blocking=False) as free:
        assert free


def test_estimates_at_sdxl_size_cover_the_measured_peaks_and_fit_a_24_gb_machine():
    """SDXL's 2.57 B-parameter UNet at a 32x32 latent (benchmarks/sdxl_compile_small.py, W = 9.59 GiB, A = 0.58
    GiB per item): build w4a8 (packed, over 2 GB expanded) peaked at 18.58 GiB, correct's fit and gate (batch 2)
    at 21.90 GiB, whole tree.
    The old 3.5 W / 3.0 W lines said 35.5 / 31.8 GiB and refused both on the machine they ran on."""
    gib = 1 << 30
    m = memory.ModelCost(weight_bytes=int(9.59 * gib), act_bytes=int(0.58 * gib), hessian_bytes=0, max_k=0)
    assert 18.58 * gib <= memory.build_peak(m) <= 20 * gib
    assert 21.90 * gib <= memory.sample_peak(m, 2) <= 23.5 * gib
    small = memory.ModelCost(weight_bytes=int(1.6e9), act_bytes=0, hessian_bytes=0, max_k=0)
    assert memory.build_peak(small) == memory.BASE + int(3.5 * 1.6e9)  # fitted sizes keep their lines
