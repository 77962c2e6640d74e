"""Full-size LDM-4 ImageNet (cin256-v2) UNet: MACs per forward vs the published count (slow: ~2.5 min, 10 GB)."""

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
