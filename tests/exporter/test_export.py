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


def test_a_large_export_is_gathered_tensor_by_tensor_with_transposes_folded(tiny_cin_ckpt, tmp_path, monkeypatch):
    """Over 2 GB, torch exports without constant folding and writes each tensor to its own file; ptqd folds the
    linear layers' weight Transposes and gathers every tensor into one aligned .data file (shown here on the tiny
    model, forced down that path): the graph computes what the normal export does, with the same layer table."""
    import onnx
    import torch

    from ptqd.exporter import onnx_export

    loaded = load_model(tiny_cin_ckpt)
    normal = tmp_path / "normal" / "unet.onnx"
    normal.parent.mkdir()
    onnx_export.export_unet(loaded, normal)
    # what torch leaves for a model over 2 GB: no folding, one file per tensor
    monkeypatch.setattr(onnx_export, "LARGE", 0)
    work = tmp_path / "torch-out"
    work.mkdir()
    raw = work / "unet.onnx"
    c, h, w = loaded.facts.latent_shape
    cond = loaded.facts.conditioning
    args = (torch.randn(1, c, h, w), torch.tensor([500.0]), torch.randn(1, cond.context_tokens, cond.context_dim))
    torch.onnx.export(loaded.unet.eval(), args, str(raw), input_names=["x", "t", "context"], output_names=["eps"],
                      opset_version=18, dynamic_axes={n: {0: "batch"} for n in ("x", "t", "context", "eps")},
                      dynamo=False, do_constant_folding=False)
    m = onnx.load(str(raw))
    onnx.save_model(m, str(raw), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    m = onnx.load(str(raw), load_external_data=False)
    assert sum(n.op_type == "Transpose" and n.input[0] in {i.name for i in m.graph.initializer} for n in m.graph.node)
    out = tmp_path / "gathered" / "unet.onnx"
    out.parent.mkdir()
    files = onnx_export.gather_external(m, work, out)
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"]
    g = onnx.load(str(out), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in g.node)
    offsets = [int(e.value) for i in g.initializer for e in i.external_data if e.key == "offset"]
    assert offsets and all(o % onnx_export.ALIGN == 0 for o in offsets)
    same_graph(loaded, normal, out, [10.0, 500.0, 990.0])


def test_a_model_over_2gb_is_exported_without_torch_holding_its_weights_twice(tiny_cin_ckpt, tmp_path, monkeypatch):
    """Above LARGE, torch traces the graph without its weights and ptqd writes them one by one (forced here on
    the tiny model): same outputs and layer table as the normal export, weights in one aligned .data file."""
    import onnx

    from ptqd.exporter import onnx_export

    loaded = load_model(tiny_cin_ckpt)
    normal, large = tmp_path / "a" / "unet.onnx", tmp_path / "b" / "unet.onnx"
    normal.parent.mkdir()
    large.parent.mkdir()
    onnx_export.export_unet(loaded, normal)
    monkeypatch.setattr(onnx_export, "LARGE", 0)
    files = onnx_export.export_unet(loaded, large)
    assert [f.name for f in files] == ["unet.onnx", "unet.onnx.data"] and not (large.parent / "unet.onnx.export").exists()
    g = onnx.load(str(large), load_external_data=False).graph
    assert [i.name for i in g.input] == ["x", "t", "context"]
    same_graph(loaded, normal, large, [3.0, 700.0])


def same_graph(loaded, normal, other, ts):
    """``other`` computes what the normal export ``normal`` does at timesteps ``ts``, and has its layer table."""
    import onnxruntime as ort

    from ptqd.exporter.layers import build_layer_table

    c, h, w = loaded.facts.latent_shape
    cond = loaded.facts.conditioning
    n = len(ts)
    feeds = {"x": np.random.RandomState(0).randn(n, c, h, w).astype(np.float32), "t": np.array(ts, np.float32),
             "context": np.random.RandomState(1).randn(n, cond.context_tokens, cond.context_dim).astype(np.float32)}
    out = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["eps"], feeds)[0]
           for p in (normal, other)}
    np.testing.assert_allclose(out[other], out[normal], atol=1e-5, rtol=0)
    a, b = build_layer_table(normal), build_layer_table(other)
    assert [(r["kind"], r["module"], r["macs"], r["weight_shape"], r["out_axis"]) for r in a["layers"]] == \
        [(r["kind"], r["module"], r["macs"], r["weight_shape"], r["out_axis"]) for r in b["layers"]]


def test_a_large_export_validates_on_torch_first_then_frees_its_weights(tiny_cin_ckpt, tmp_path, monkeypatch):
    """Over 2 GB the UNet check takes torch's outputs first, frees torch's weights, then loads ONNX Runtime's copy
    (one copy of a 10 GB model at a time), at two timesteps of batch 1 (forced here on the tiny model)."""
    from ptqd.exporter import onnx_export, validate

    monkeypatch.setattr(onnx_export, "LARGE", 0)
    released = []
    real_release = validate.release_weights
    monkeypatch.setattr(validate, "release_weights", lambda m: (released.append(m), real_release(m)))
    out = tmp_path / "large.bundle"
    api.export(tiny_cin_ckpt, out, progress=False)
    rep = Bundle.open(out).read_json("reports/export_validation.json")["unet"]
    assert rep["passed"] and rep["batch"] == 1 and [r["t"] for r in rep["per_timestep"]] == [1.0, 999.0]
    assert len(released) == 1 and all(p.is_meta for p in released[0].parameters())


def test_validation_after_freeing_torch_still_catches_a_graph_that_differs(tiny_cin_ckpt, tmp_path):
    from ptqd.errors import ExportError
    from ptqd.exporter import onnx_export
    from ptqd.exporter.validate import LARGE_VALIDATION, validate_unet

    loaded = load_model(tiny_cin_ckpt)
    path = tmp_path / "unet.onnx"
    onnx_export.export_unet(loaded, path)
    with torch.no_grad():
        next(p for p in loaded.unet.parameters() if p.ndim == 4).add_(0.05)  # torch no longer what was exported
    with pytest.raises(ExportError, match="does not match torch"):
        validate_unet(loaded, path, LARGE_VALIDATION, release=True)
    assert all(p.is_meta for p in loaded.unet.parameters())
