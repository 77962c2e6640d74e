"""``--weight-grid full``: 8-bit weights on ±127 are machine-specific (exact only where int8 products are summed in
32 bits: VNNI or AMX). The calibration says so, build.json records it, and a CPU without VNNI refuses to build or
load such an engine instead of computing wrong numbers."""

import numpy as np
import pytest

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.errors import UserError
from ptqd.resources import has_vnni


@pytest.fixture(scope="module")
def full_grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid") / "demo.bundle"
    api.export("demo", d, progress=False)
    api.calibrate(d, samples=4, steps=4, progress=False, weight_grid="full")
    return d


def no_vnni(monkeypatch):
    monkeypatch.setattr("ptqd.resources.cpu_isa", lambda: ["avx2"])


def test_full_grid_weights_use_all_of_int8(full_grid):
    b = Bundle.open(full_grid)
    assert b.stage("calibrate")["config"]["reduce_range"] is False
    meta = b.read_json("calib/w8a8.json")
    arrays = np.load(b.path("calib/w8a8.npz"))
    peak = max(int(np.abs(arrays[f"{m['index']}.w_int"]).max()) for m in meta["layers"] if m["w_bits"] == 8)
    assert peak == 127  # the portable grid stops at 63


def test_without_vnni_the_build_is_refused_with_the_fix(full_grid, monkeypatch):
    no_vnni(monkeypatch)
    with pytest.raises(UserError, match=r"(?s)VNNI or AMX.*--weight-grid portable"):
        api.build(full_grid, precisions=("w8a8",), progress=False)


@pytest.mark.skipif(not has_vnni(), reason="this CPU has no VNNI/AMX: full-grid engines cannot be built here")
def test_with_vnni_the_engine_validates_records_its_needs_and_is_refused_on_another_cpu(full_grid, monkeypatch):
    recs = api.build(full_grid, precisions=("w8a8",), progress=False)
    rec = recs["w8a8"]
    assert rec["validation_vs_fake_quant"]["passed"], rec["validation_vs_fake_quant"]
    assert rec["requires"]["isa"] == "vnni" and "±127" in rec["numerics"] and rec["built_on"]
    x, _ = api.sample(full_grid, num=2, steps=3, precision="w8a8", progress=False)
    assert np.isfinite(x).all()
    no_vnni(monkeypatch)  # the same bundle on a CPU without VNNI: refused at load, naming the fix
    with pytest.raises(UserError, match=r"(?s)w8a8 engine.*neither.*--weight-grid portable"):
        api.sample(full_grid, num=2, steps=3, precision="w8a8", progress=False)


def test_the_default_grid_is_portable_and_records_no_needs(tmp_path):
    d = tmp_path / "demo.bundle"
    api.export("demo", d, progress=False)
    api.calibrate(d, samples=2, steps=2, progress=False)
    assert Bundle.open(d).stage("calibrate")["config"]["reduce_range"] is True
    with pytest.raises(UserError, match="--weight-grid must be one of"):
        api.calibrate(d, samples=2, steps=2, progress=False, weight_grid="wide")
