"""Export to bundles: ONNX matches torch (FP32, within 1e-4), dynamic batch, the layer table's MACs."""

import json

import numpy as np
import pytest
import torch

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.models import load_model
from tests.conftest import ort_vs_torch


def test_compvis_bundle_matches_torch(tiny_cin_ckpt, tiny_cin_bundle):
    b = Bundle.open(tiny_cin_bundle)
    assert {"unet.onnx", "unet.layers.json", "first_stage.onnx", "cond/class_embedding.npy"} <= set(b.files)
    rec = b.stage("export")
    assert rec["validation"]["unet"]["passed"] and rec["validation"]["unet"]["worst_abs_error"] < 1e-4
    assert rec["inputs"] == ["x", "t", "context"]
    loaded = load_model(tiny_cin_ckpt)
    assert ort_vs_torch(tiny_cin_bundle, loaded, batch=3) < 1e-4
    assert ort_vs_torch(tiny_cin_bundle, loaded, batch=1, seed=5) < 1e-4  # dynamic batch
    emb = np.load(b.path("cond/class_embedding.npy"))
    np.testing.assert_array_equal(emb, loaded.class_embedding)


def test_first_stage_decoder_matches_torch(tiny_cin_ckpt, tiny_cin_bundle):
    import onnxruntime as ort

    loaded = load_model(tiny_cin_ckpt)
    z = np.random.RandomState(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    got = ort.InferenceSession(str(tiny_cin_bundle / "first_stage.onnx")).run(["image"], {"z": z})[0]
    with torch.no_grad():
        ref = loaded.first_stage(torch.from_numpy(z)).numpy()
    assert got.shape == (2, 3, 16, 16)
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_diffusers_cond", "tiny_diffusers_uncond"])
def test_diffusers_bundle_matches_torch(fixture, request, tmp_path):
    src = request.getfixturevalue(fixture)
    out = tmp_path / "d.bundle"
    rec = api.export(src, out, progress=False)
    assert rec["validation"]["unet"]["worst_abs_error"] < 1e-4
    assert rec["first_stage"] and rec["validation"]["first_stage"]["passed"]
    assert ort_vs_torch(out, load_model(src)) < 1e-4
    info = api.inspect(out)
    assert info["model"]["family"] == "diffusers" and info["macs_per_forward"] > 0


def _torch_macs(loaded):
    """Oracle independent of the ONNX graph: forward hooks on the torch modules (batch 1)."""
    from ptqd.models.compvis_unet import AttentionBlock, CrossAttention

    macs = {"conv": 0, "linear": 0, "attention": 0}

    def hook(mod, inp, out):
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
            macs["conv"] += out.numel() * mod.weight[0].numel()
        elif isinstance(mod, torch.nn.Linear):
            macs["linear"] += out.numel() * mod.in_features
        elif isinstance(mod, CrossAttention):
            nq = inp[0].shape[1]
            nk = inp[1].shape[1] if len(inp) > 1 and inp[1] is not None else nq
            macs["attention"] += 2 * nq * nk * mod.to_q.out_features
        elif isinstance(mod, AttentionBlock):
            c, t = inp[0].shape[1], inp[0].shape[2] * inp[0].shape[3]
            macs["attention"] += 2 * t * t * c

    handles = [m.register_forward_hook(hook) for m in loaded.unet.modules()]
    c, h, w = loaded.facts.latent_shape
    args = [torch.zeros(1, c, h, w), torch.tensor([500.0])]
    if loaded.unet.has_context:
        args.append(loaded.context_for([0]))
    with torch.no_grad():
        loaded.unet(*args)
    for hd in handles:
        hd.remove()
    return macs


def test_layer_table_macs_match_torch_hooks(tiny_cin_ckpt, tiny_cin_bundle):
    table = json.loads((tiny_cin_bundle / "unet.layers.json").read_text())
    assert table["macs_by_kind"] == _torch_macs(load_model(tiny_cin_ckpt))
    rows = table["layers"]
    names = {r["name"] for r in rows}
    assert len(names) == len(rows)
    by_module = {r["module"]: r for r in rows if r["kind"] != "attention"}
    # modules map back to checkpoint names, with the weight shape of that checkpoint tensor
    from ptqd.models.tiny import compvis_state_dict, tiny_cin_config

    state = compvis_state_dict(tiny_cin_config())
    for module, r in by_module.items():
        w = state[f"model.diffusion_model.{module}.weight"]
        shape = list(w.shape) if r["op"] != "MatMul" else list(w.shape[::-1])
        assert r["weight_shape"] == shape, module
        assert r["out_axis"] == (1 if r["op"] == "MatMul" else 0)
    assert any(m.endswith("skip_connection") for m in by_module) and any(m.endswith(".op") for m in by_module)


def test_uncond_attention_block_macs(tmp_path):
    from ptqd.models.tiny import tiny_uncond_config, write_compvis_checkpoint

    ckpt = write_compvis_checkpoint(tmp_path / "u.ckpt", tiny_uncond_config())
    api.export(ckpt, tmp_path / "u.bundle", progress=False, first_stage=False)
    table = json.loads((tmp_path / "u.bundle" / "unet.layers.json").read_text())
    assert table["macs_by_kind"] == _torch_macs(load_model(ckpt))
    assert "first_stage.onnx" not in Bundle.open(tmp_path / "u.bundle").files


def test_failed_export_leaves_previous_bundle(tiny_cin_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "b"
    api.export(tiny_cin_ckpt, out, progress=False, first_stage=False)
    before = (out / "manifest.json").read_text()
    from ptqd.errors import ExportError
    import ptqd.exporter.validate as v

    def broken(*a, **k):
        raise ExportError("exported UNet does not match torch: t=1: simulated")

    monkeypatch.setattr(v, "validate_unet", broken)
    monkeypatch.setattr("ptqd.exporter.validate_unet", broken)
    with pytest.raises(ExportError):
        api.export(tiny_cin_ckpt, out, progress=False)
    assert (out / "manifest.json").read_text() == before
    Bundle.open(out).verify_all()


def test_dynamo_exporter_also_matches(tiny_cin_ckpt, tmp_path):
    rec = api.export(tiny_cin_ckpt, tmp_path / "b", progress=False, first_stage=False, exporter="dynamo")
    assert rec["validation"]["unet"]["worst_abs_error"] < 1e-4
    table = json.loads((tmp_path / "b" / "unet.layers.json").read_text())
    tiny = json.loads((tmp_path / "b" / "unet.layers.json").read_text())
    assert table["macs_by_kind"] == _torch_macs(load_model(tiny_cin_ckpt)) == tiny["macs_by_kind"]
    assert all(r["module"] for r in table["layers"] if r["kind"] != "attention")
