"""NNCF + OpenVINO INT8, the CPU peer, built into a bundle on request (``--precisions nncf-int8,nncf-mixed,
nncf-hybrid``) so that ``ptqd eval`` and ``ptqd bench`` put it beside ptqd's engines; refused up front without
nncf."""

import importlib.util
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def peer_bundle(compiled, tmp_path_factory):
    pytest.importorskip("nncf")
    from ptqd import api

    out = tmp_path_factory.mktemp("nncf") / "demo.bundle"
    shutil.copytree(compiled[0], out)
    recs = api.build(out, backend="openvino", precisions=("w8a8", "nncf-int8", "nncf-mixed", "nncf-hybrid"),
                     progress=False)
    return out, recs


def test_the_peers_are_built_from_the_calibration_inputs_and_measured_against_fp32(peer_bundle):
    from ptqd import api
    from ptqd.bundle import Bundle, layout
    from ptqd.engines.compare import rel_l2
    from ptqd.facts import seeded_unet_inputs

    out, recs = peer_bundle
    peers = ("nncf-int8", "nncf-mixed", "nncf-hybrid")
    assert set(recs) == {"w8a8", *peers}
    b = Bundle.open(out)
    items = min(64, len(np.load(b.path(layout.CALIB_FEEDS))["t"]))
    for p in peers:
        r = recs[p]
        assert r["calibration_items"] == items and r["nncf"] and "validation_vs_fake_quant" not in r
        assert 0 < r["vs_fp32"]["median_rel_l2"] < 0.5, r["vs_fp32"]  # quantized, and still the same model
    assert "default recipe" in recs["nncf-int8"]["numerics"] and "mixed" in recs["nncf-mixed"]["numerics"]
    assert "weight-only" in recs["nncf-hybrid"]["numerics"]
    assert recs["w8a8"]["validation_vs_fake_quant"]["passed"]  # ptqd's engines are built as before beside them
    assert b.stage("build_openvino")["precisions"] == ["nncf-hybrid", "nncf-int8", "nncf-mixed", "w8a8"]
    f = seeded_unet_inputs(b.facts, 2, 501.0, 0)
    args = (f["x"], f["t"], f.get("context"))
    fp = api.open_engine(b, "fp32")(*args)
    got = {p: api.open_engine(b, p, backend="openvino")(*args) for p in peers}
    for p, y in got.items():
        assert y.shape == fp.shape and np.isfinite(y).all()
        assert 0 < rel_l2(y, fp) < 0.5, p
    assert not np.array_equal(got["nncf-int8"], got["nncf-mixed"])  # three recipes, three engines
    assert not np.array_equal(got["nncf-mixed"], got["nncf-hybrid"])
    with pytest.raises(Exception, match="no nncf-int8 engine"):  # an OpenVINO engine, not an ONNX Runtime one
        api.open_engine(b, "nncf-int8")


def test_inspect_counts_the_peers_bops_and_pack_ships_one(peer_bundle, tmp_path):
    from ptqd.bundle import Bundle, layout
    from ptqd.cli import main
    from ptqd.stages.plan import bops_table

    table = bops_table(Bundle.open(peer_bundle[0]))["precisions"]
    assert {"ort-int8", "nncf-int8", "nncf-mixed", "nncf-hybrid"} <= set(table)
    assert table["nncf-int8"]["saving_vs_fp32"] == pytest.approx(table["ort-int8"]["saving_vs_fp32"])
    assert 1 < table["nncf-hybrid"]["saving_vs_fp32"] < table["nncf-int8"]["saving_vs_fp32"]
    out = tmp_path / "packed"
    assert main(["pack", str(peer_bundle[0]), "--plan", "nncf-mixed", "--backend", "openvino", "--out", str(out)]) == 0
    packed = Bundle.open(out)
    assert packed.has(layout.ov_engine("nncf-mixed")[0]) and not packed.has(layout.ov_engine("w8a8")[0])


def test_eval_and_bench_put_the_peer_beside_ptqds_engines(peer_bundle, capsys):
    from ptqd.cli import main
    from ptqd.tools.bench import bench

    out = str(peer_bundle[0])
    assert main(["eval", out, "--precisions", "fp32,w8a8,nncf-int8,nncf-hybrid", "--num", "8", "--steps", "4",
                 "--backend", "openvino", "--json"]) == 0
    rows = {r["precision"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert "nncf-int8" in rows and rows["nncf-int8"]["psnr_vs_fp"] > 10
    # the peer quantizes every conv and linear layer at 8 x 8 bits; ptqd's w8a8 keeps skip convs and embeddings float
    assert rows["nncf-int8"]["bops_saving"] > rows["w8a8+ptqd"]["bops_saving"] > 1
    # hybrid: linear layers keep float products (int8 weights decompressed), so they count 32 x 32
    assert 1 < rows["nncf-hybrid"]["bops_saving"] < rows["nncf-int8"]["bops_saving"]
    res = bench(out, precisions=["w8a8", "nncf-int8"], runs=2, warmup=1, large_batch=2, e2e_images=1, e2e_runs=1,
                torch_peer=False, memory=False, peers=False)
    assert res["engines"]["nncf-int8@openvino"]["latency"]["1"]["median_ms"] > 0
    assert "nncf-int8" not in res["engines"]  # no ONNX Runtime engine of the peer was opened
    # each OpenVINO engine says what its float parts run in: the peer at OpenVINO's default on this CPU
    from ptqd.engines.openvino import openvino_default_precision

    assert peer_bundle[1]["nncf-int8"]["float_precision"] == openvino_default_precision()
    assert any(n.startswith(f"nncf-int8@openvino: float parts in {openvino_default_precision()}")
               for n in res["notes"]), res["notes"]


def test_without_nncf_the_peer_is_refused_before_anything_is_built(compiled, tmp_path, monkeypatch):
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.errors import MissingDependencyError

    out = tmp_path / "demo.bundle"
    shutil.copytree(compiled[0], out)
    before = dict(Bundle.open(out).files)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"nncf-mixed .*pip install 'ptqd\[peers\]'"):
        api.build(out, backend="openvino", precisions=("w8a8", "nncf-mixed"), progress=False)
    assert Bundle.open(out).files == before  # not even w8a8 was built
    with pytest.raises(Exception, match="unknown precision.*nncf-int8, nncf-mixed"):
        api.build(out, backend="openvino", precisions=("nncf-int4",), progress=False)
