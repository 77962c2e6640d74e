"""``--outliers``: smoothing and the low-rank branch are an FP-equivalent rewrite, fitted where it lowers the 4-bit
error, reloaded exactly by the later stages, and the engines still compute the fake-quant model."""

import numpy as np
import pytest
import torch

from ptqd import api
from ptqd.bundle import Bundle, layout
from ptqd.calib import outliers as ol
from ptqd.calib.calibrate import select_layers
from ptqd.errors import UserError


@pytest.fixture(scope="module")
def svd_bundle(tiny_cin_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("svd") / "svd.bundle"
    api.export(tiny_cin_ckpt, out, progress=False, outliers="svd", rank_budget=0.2)
    return out


def test_main_weight_plus_branch_is_the_smoothed_weight():
    rng = np.random.RandomState(0)
    w = rng.randn(6, 4, 3, 3).astype(np.float32)
    inv_s = rng.uniform(0.2, 5, 4).astype(np.float32)
    a, b = rng.randn(2, 4, 3, 3).astype(np.float32), rng.randn(6, 2, 1, 1).astype(np.float32)
    main = ol.main_weight(w, inv_s, a, b)
    smoothed = w.astype(np.float64) / inv_s.astype(np.float64)[None, :, None, None]
    ba = np.einsum("or,rikl->oikl", b[:, :, 0, 0].astype(np.float64), a.astype(np.float64))
    assert main.dtype == np.float32 and np.abs(main + ba - smoothed).max() < 1e-5 * np.abs(smoothed).max()
    assert np.array_equal(main, ol.main_weight(w.copy(), inv_s.copy(), a.copy(), b.copy()))
    assert np.array_equal(ol.main_weight(w, None, None, None), w)


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    """One input channel 40x the others and its weights 40x smaller (it adds as much to the output as any other):
    per-tensor 4-bit activations lose the other channels; smoothing wins them back."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, 3] /= 40.0
    X = torch.randn(2048, 16, generator=gen)
    X[:, 3] *= 40.0
    rw = ol.fit_layer("l", lin, X, X.abs().amax(0).numpy(), "smooth", 0.05)
    assert rw.alpha is not None and rw.rank == 0 and rw.a is None
    assert rw.errors["after"] < 0.3 * rw.errors["before"]
    assert rw.inv_s[3] < rw.inv_s[[0, 1, 2, 4]].min()  # the outlier channel is divided the most


def test_the_branch_takes_a_dominant_weight_direction():
    """A weight that is a large rank-1 part plus small detail: 4-bit rows lose the detail; with the rank-1 part on
    the 8-bit branch the residual keeps it."""
    gen = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(0.05 * torch.randn(32, 64, generator=gen)
                         + torch.randn(32, 1, generator=gen) @ torch.randn(1, 64, generator=gen))
    X = torch.randn(4096, 64, generator=gen)
    rw = ol.fit_layer("l", lin, X, X.abs().amax(0).numpy(), "lowrank", 0.1)
    assert rw.alpha is None and rw.rank == ol.rank_for(32, 64, 0.1) > 0 and rw.a.shape == (rw.rank, 64)
    assert rw.errors["after"] < 0.7 * rw.errors["before"]
    assert rw.errors["w7a8_after"] <= rw.errors["w7a8_before"]  # never at 8 bits' expense


def test_rank_budget_bounds_the_branch_macs():
    for c_out, k in ((320, 2880), (64, 64), (1280, 11520)):
        r = ol.rank_for(c_out, k, 0.05)
        assert r * (k + c_out) <= 0.05 * c_out * k < (r + 1) * (k + c_out)


def test_select_keeps_the_share_of_layers_where_the_rewrite_helps_most():
    def rw(name, before, after):
        return ol.LayerRewrite(name, 0.5, 1, {"before": before, "after": after}, None, None, None)

    found = [rw("a", 0.02, 0.019), rw("b", 0.06, 0.03), rw("c", 0.01, 0.0099), rw("d", 0.03, 0.02)]
    assert [r.module for r in ol.select(found, 10, 0.2)] == ["b", "d"]  # 2 of 10 body layers, in graph order
    assert [r.module for r in ol.select(found, 10, 0.25)] == ["a", "b", "d"]  # ceil(2.5)
    assert ol.select(found, 10, 1.0) == found  # more room than rewrites: all of them
    assert [r.module for r in ol.select(found, 4, 0.01)] == ["b"]  # never none


def test_a_share_of_the_layers_is_rewritten_on_request(svd_bundle, tiny_cin_ckpt, tmp_path, capsys):
    rec_all = Bundle.open(svd_bundle).stage("export")["outliers"]
    out = tmp_path / "half.bundle"
    api.export(tiny_cin_ckpt, out, progress=False, outliers="svd", rank_budget=0.2, outlier_layers=0.3,
               validate=False)
    b = Bundle.open(out)
    rec = b.stage("export")["outliers"]
    meta = b.read_json(layout.OUTLIERS_JSON)
    assert rec["layer_share"] == meta["layer_share"] == 0.3 and 0 < rec["layers"] < rec_all["layers"]
    kept = {m["module"] for m in meta["layers"]}
    every = Bundle.open(svd_bundle).read_json(layout.OUTLIERS_JSON)["layers"]
    gains = sorted(((m["errors"]["before"] - m["errors"]["after"], m["module"]) for m in every), reverse=True)
    assert kept == {m for _, m in gains[:len(kept)]}  # the same fit, the largest gains kept
    mains = [r["module"] for r in b.read_json(layout.UNET_LAYERS)["layers"] if r["module"].endswith(".main")]
    assert len(mains) == rec["layers"]
    from ptqd.cli import main

    assert main(["inspect", str(out)]) == 0
    assert "--outlier-layers 0.3" in capsys.readouterr().out


def test_export_rewrites_the_body_layers_fp_equivalently(svd_bundle, tiny_cin_ckpt):
    from ptqd.models import load_model
    from ptqd.stages.common import load_source

    b = Bundle.open(svd_bundle)
    rec = b.stage("export")["outliers"]
    assert rec["mode"] == "svd" and rec["layers"] > 0 and rec["branch_ranks"] > 0 and rec["smoothed"] > 0
    assert rec["w4a4_layer_rel_error"]["after"] < rec["w4a4_layer_rel_error"]["before"]
    rows = b.read_json(layout.UNET_LAYERS)["layers"]
    roles = {r["module"]: r["role"] for r in select_layers(rows)}
    branches = [m for m in roles if ".lowrank." in m]
    assert branches and all(roles[m] == "w8" for m in branches)  # the branches run on 8-bit kernels
    mains = [m for m in roles if m.endswith(".main")]
    assert len(mains) == rec["layers"] and all(roles[m] == "body" for m in mains)
    # the rewritten model (as the later stages load it) computes the source's eps
    plain, rewritten = load_model(tiny_cin_ckpt, with_first_stage=False), load_source(b)
    x = torch.randn(3, *b.facts.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999.0, 500.0, 3.0])
    c = plain.context_for(np.array([0, 1, 2]))
    with torch.no_grad():
        want, got = plain.unet(x, t, c), rewritten.unet(x, t, c)
    assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    assert b.stage("export")["validation"]["unet"]["passed"]  # the graph computes the rewritten model


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_engines_of_a_rewritten_bundle_compute_the_fake_quant_model(svd_bundle, tmp_path, backend):
    import shutil

    if backend == "openvino":
        pytest.importorskip("openvino")
    d = tmp_path / "b.bundle"
    shutil.copytree(svd_bundle, d)
    api.calibrate(d, samples=2, steps=3, rounding="nearest", progress=False)
    built = api.build(d, backend=backend, precisions=["w4a4"], progress=False)["w4a4"]
    v = built["buckets"][0]["validation_vs_fake_quant"] if "buckets" in built else built["validation_vs_fake_quant"]
    assert v["passed"], v


def test_bad_outlier_options_are_one_line_errors(tiny_cin_ckpt, tmp_path):
    with pytest.raises(UserError, match="--outliers must be one of"):
        api.export(tiny_cin_ckpt, tmp_path / "x.bundle", progress=False, outliers="rotate")
    with pytest.raises(UserError, match="--rank-budget"):
        api.export(tiny_cin_ckpt, tmp_path / "x.bundle", progress=False, outliers="svd", rank_budget=0.0)
    with pytest.raises(UserError, match="--outlier-layers"):
        api.export(tiny_cin_ckpt, tmp_path / "x.bundle", progress=False, outliers="svd", outlier_layers=0.0)
    assert not (tmp_path / "x.bundle").exists()


def test_cli_rewrites_on_request_and_inspect_reports_it(svd_bundle, tmp_path, capsys):
    from ptqd.cli import main
    from ptqd.stages.compile import exported_outliers

    assert exported_outliers(Bundle.open(svd_bundle).stage("export")) == {"mode": "svd", "rank_budget": 0.2,
                                                                          "layer_share": 1.0}
    assert exported_outliers({"source": "demo"}) is None  # what compile compares: a new setting re-exports
    older = {"outliers": {"mode": "svd", "rank_budget": 0.2}}  # a bundle from before --outlier-layers: all layers
    assert exported_outliers(older) == {"mode": "svd", "rank_budget": 0.2, "layer_share": 1.0}
    assert exported_outliers({"outliers": {**older["outliers"], "layer_share": 0.5}})["layer_share"] == 0.5
    assert main(["inspect", str(svd_bundle)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("outliers")]
    assert line and "svd:" in line[0] and "of MACs" in line[0]
    assert main(["export", "demo", "--out", str(tmp_path / "x.bundle"), "--outliers", "svd", "--rank-budget", "2"]) == 1
    assert "--rank-budget" in capsys.readouterr().err and not (tmp_path / "x.bundle").exists()
    assert main(["compile", "demo", "--out", str(tmp_path / "x.bundle"), "--outliers", "svd", "--outlier-layers", "1.5"]) == 1
    assert "--outlier-layers" in capsys.readouterr().err and not (tmp_path / "x.bundle").exists()
