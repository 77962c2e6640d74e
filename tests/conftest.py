"""Shared fixtures: tiny seeded models in real checkpoint layouts (built in code, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def tiny_cin_ckpt(tmp_path_factory) -> Path:
    """cin256-v2 scaled down, as a CompVis ``.ckpt`` ({'state_dict': ...}) with ``<stem>.yaml`` beside it."""
    from ptqd.models.tiny import tiny_cin_config, write_compvis_checkpoint

    return write_compvis_checkpoint(tmp_path_factory.mktemp("cin") / "cin.ckpt", tiny_cin_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_cin_bundle(tiny_cin_ckpt, tmp_path_factory) -> Path:
    from ptqd import api

    out = tmp_path_factory.mktemp("cinb") / "cin.bundle"
    api.export(tiny_cin_ckpt, out, progress=False)
    return out


def _save_diffusers_pipeline(root: Path, conditional: bool) -> Path:
    import torch
    from diffusers import UNet2DConditionModel, UNet2DModel, VQModel

    torch.manual_seed(0)
    if conditional:
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
        from safetensors.torch import save_file

        save_file({"embedding.weight": torch.randn(11, 32)}, str(root / "class_embedding.safetensors"),
                  metadata={"null_class": "10"})
    else:
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                           norm_num_groups=32)
    # zero-initialised output convs would make every output 0: give all weights some signal
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(root / "unet")
    VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(32, 32),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            num_vq_embeddings=16, norm_num_groups=32).save_pretrained(root / "vqvae")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195,
        "num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    return root


@pytest.fixture(scope="session")
def tiny_diffusers_cond(tmp_path_factory) -> Path:
    return _save_diffusers_pipeline(tmp_path_factory.mktemp("dcond"), conditional=True)


@pytest.fixture(scope="session")
def tiny_diffusers_uncond(tmp_path_factory) -> Path:
    return _save_diffusers_pipeline(tmp_path_factory.mktemp("duncond"), conditional=False)


def random_unet_feeds(model, batch: int, seed: int = 0) -> dict:
    """Seeded random inputs for an exported UNet ONNX ``model`` at ``batch`` (t: integer timesteps)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    out = {}
    for i in model.graph.input:
        shape = [batch if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        out[i.name] = (rng.integers(0, 1000, shape) if i.name == "t" else rng.standard_normal(shape)).astype(dtype)
    return out


def ort_vs_torch(bundle: Path, loaded, batch: int = 3, seed: int = 123) -> float:
    """Independent of the exporter's own validation: worst |ORT - torch| at random t, random batch."""
    import onnxruntime as ort
    import torch

    rng = np.random.RandomState(seed)
    c, h, w = loaded.facts.latent_shape
    feeds = {"x": rng.standard_normal((batch, c, h, w)).astype(np.float32),
             "t": rng.uniform(0, 999, batch).astype(np.float32)}
    if loaded.unet.has_context:
        labels = rng.randint(0, loaded.facts.conditioning.num_classes, batch)
        feeds["context"] = loaded.context_for(labels).numpy()
    sess = ort.InferenceSession(str(bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["eps"], feeds)[0]
    with torch.no_grad():
        ref = loaded.unet(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert np.abs(ref).max() > 1e-2, "degenerate model: outputs are ~0"
    return float(np.abs(got - ref).max())


SMALL_COMPILE = dict(precisions=("w8a8", "w4a8", "w4a4", "ort-int8"), samples=8, steps=10, correction_samples=12,
                     holdout=4)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """The demo model through `ptqd compile` with small settings: (bundle, result, log lines)."""
    from ptqd import api

    out = tmp_path_factory.mktemp("c") / "demo.bundle"
    log = []
    res = api.compile("demo", out, progress=False, log=log.append, **SMALL_COMPILE)
    return out, res, log


def make_bundle(path, payload=b"v1"):
    """A minimal bundle with one binary file, one JSON file and one stage record (bundle tests)."""
    from ptqd.bundle import Bundle

    with Bundle.transaction(path, create=True) as w:
        w.write_bytes("a/data.bin", payload)
        w.write_json("info.json", {"x": 1})
        w.set_stage("test", {"n": 1})
    return Bundle.open(path)


def edit_manifest(path, fn):
    """Apply ``fn`` to a bundle's manifest dict in place, bypassing the store (to test damaged manifests)."""
    from ptqd.bundle import MANIFEST

    m = json.loads((Path(path) / MANIFEST).read_text())
    fn(m)
    (Path(path) / MANIFEST).write_text(json.dumps(m))
