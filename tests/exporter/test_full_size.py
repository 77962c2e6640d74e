"""Full-size LDM-4 ImageNet (cin256-v2) UNet: MACs per forward vs the published count (slow: ~2.5 min, 10 GB)."""

import json

import pytest


@pytest.mark.slow
def test_cin256_v2_macs_within_2_percent(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ptqd import api
    from ptqd.models.compvis import CIN256_V2, parse_config
    from ptqd.models.compvis_unet import UNetModel

    ucfg, *_ = parse_config(CIN256_V2)
    torch.manual_seed(0)
    state = {f"model.diffusion_model.{k}": v for k, v in UNetModel(ucfg).state_dict().items()}
    state["cond_stage_model.embedding.weight"] = torch.randn(1001, 512)
    save_file(state, str(tmp_path / "cin.safetensors"))
    del state
    api.export(tmp_path / "cin.safetensors", tmp_path / "b", config=CIN256_V2, first_stage=False, progress=False)
    info = api.inspect(tmp_path / "b")
    by = info["macs_by_kind"]
    assert abs(info["macs_per_forward"] / 104.2e9 - 1) < 0.02
    assert abs(by["conv"] / 72.1e9 - 1) < 0.02
    assert abs(by["linear"] / 27.6e9 - 1) < 0.02
    assert abs(by["attention"] / 4.45e9 - 1) < 0.02
    assert abs(info["weight_params"] / 400.9e6 - 1) < 0.01
    # BOPs: FP32 102.2 T as in PTQD; the shipped copy of this layer table (tests/test_bops.py) is current
    assert abs(info["bops"]["fp32"] / 102.2e12 - 1) < 0.005
    import gzip
    import json
    from pathlib import Path

    from ptqd.bundle import Bundle

    shipped = json.loads(gzip.decompress((Path(__file__).parent.parent / "data" / "cin256_layers.json.gz").read_bytes()))
    fresh = Bundle.open(tmp_path / "b").read_json("unet.layers.json")
    assert [(r["name"], r["macs"], r["kind"]) for r in fresh["layers"]] == \
        [(r["name"], r["macs"], r["kind"]) for r in shipped["layers"]]


@pytest.mark.slow
def test_sdxl_base_unet_exports_and_its_layer_table_counts_the_macs_at_1024(tmp_path):
    """The full-size SDXL base UNet (2.57 B parameters, random weights; ~6 min, 10 GB of disk twice, 14 GB of
    memory): `ptqd export` writes it with external data and validates it against torch at 1024x1024, and the layer
    table's MACs per forward at 1024x1024 equal an independent count (forward hooks on diffusers' model, on the meta
    device), kind by kind."""
    import subprocess
    import sys

    import torch

    from ptqd import api
    from ptqd.models.macs import count_macs
    from ptqd.models.tiny_sd import sdxl_base_unet

    import shutil

    if shutil.disk_usage(tmp_path).free < 25e9:  # the pipeline and the bundle: 10.3 GB each
        pytest.skip("needs 25 GB of free disk for the 2.57 B-parameter pipeline and its bundle")
    src = tmp_path / "sdxl"
    code = f"from ptqd.models.tiny_sd import write_sdxl_base_pipeline as w; w({str(src)!r})"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0  # its 10 GB freed before the export
    api.export(src, tmp_path / "b", first_stage=False, progress=False)  # validated: torch first, then its weights freed
    rep = json.loads((tmp_path / "b" / "reports/export_validation.json").read_text())["unet"]
    assert rep["passed"] and len(rep["per_timestep"]) == 2 and rep["worst_abs_error"] < 1e-4
    info = api.inspect(tmp_path / "b")
    unet = sdxl_base_unet(device="meta")
    with torch.device("meta"):
        added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
        hooks = count_macs(unet, torch.randn(1, 4, 128, 128), torch.tensor([500.0]),
                           encoder_hidden_states=torch.randn(1, 77, 2048), added_cond_kwargs=added)
    assert info["macs_by_kind"] == hooks, (info["macs_by_kind"], hooks)
    assert abs(info["macs_per_forward"] / 3.3806e12 - 1) < 1e-3
    weights = sum(m.weight.numel() for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert info["weight_params"] == weights and sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert (tmp_path / "b" / "unet.onnx.data").stat().st_size > 10e9
