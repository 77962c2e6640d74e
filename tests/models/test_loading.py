"""Loading CompVis checkpoints and diffusers directories, and every way that can go wrong."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptqd.errors import ModelLoadError, UserError
from ptqd.models import load_model
from ptqd.models.tiny import compvis_state_dict, tiny_cin_config, tiny_uncond_config


def test_cin_checkpoint_loads_with_facts(tiny_cin_ckpt):
    m = load_model(tiny_cin_ckpt)  # config found beside the checkpoint
    f = m.facts
    assert f.family == "compvis-ldm" and f.latent_shape == (3, 8, 8) and f.image_shape == (3, 16, 16)
    assert (f.conditioning.kind, f.conditioning.num_classes, f.conditioning.null_class) == ("class", 11, 10)
    assert f.schedule.kind == "scaled_linear" and f.schedule.num_train_timesteps == 1000
    # CompVis "linear" = (linspace(sqrt(b0), sqrt(b1)))^2
    np.testing.assert_allclose(f.schedule.betas[[0, -1]], [0.0015, 0.0195], rtol=1e-12)
    assert not np.allclose(f.schedule.betas[500], (0.0015 + 0.0195) / 2)
    assert m.class_embedding.shape == (11, 32)
    assert m.context_for([3, 10]).shape == (2, 1, 32)


def test_safetensors_and_unconditional(tmp_path):
    from ptqd.models.tiny import write_compvis_checkpoint

    ckpt = write_compvis_checkpoint(tmp_path / "u.safetensors", tiny_uncond_config())
    m = load_model(ckpt, config=ckpt.with_suffix(".yaml"))
    assert m.facts.conditioning.kind == "none" and not m.unet.has_context
    with torch.no_grad():
        out = m.unet(torch.zeros(2, 3, 8, 8), torch.tensor([1.0, 900.0]))
    assert out.shape == (2, 3, 8, 8)


def _save(tmp_path, state, cfg, name="m.ckpt"):
    p = tmp_path / name
    torch.save({"state_dict": state}, p)
    p.with_suffix(".yaml").write_text(yaml.safe_dump(cfg))
    return p


def test_missing_file_is_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope.ckpt")


def test_missing_config_is_user_error(tmp_path):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": {}}, p)
    with pytest.raises(UserError, match="--config"):
        load_model(p)


def test_unexpected_and_missing_keys_are_listed(tmp_path):
    cfg = tiny_cin_config()
    state = compvis_state_dict(cfg)
    state["model.diffusion_model.extra_block.weight"] = torch.zeros(3)
    del state["model.diffusion_model.out.2.bias"]
    with pytest.raises(ModelLoadError) as e:
        load_model(_save(tmp_path, state, cfg))
    msg = str(e.value)
    assert "missing key(s): out.2.bias" in msg and "unexpected key(s): extra_block.weight" in msg


def test_unknown_top_level_key_is_listed(tmp_path):
    cfg = tiny_cin_config()
    state = compvis_state_dict(cfg)
    state["something_else.weight"] = torch.zeros(1)
    with pytest.raises(ModelLoadError, match="something_else.weight"):
        load_model(_save(tmp_path, state, cfg))


def test_config_that_does_not_match_tensors(tmp_path):
    state = compvis_state_dict(tiny_cin_config(model_channels=32))
    with pytest.raises(ModelLoadError, match=r"shapes that do not match the config: .*\(config \(64,"):
        load_model(_save(tmp_path, state, tiny_cin_config(model_channels=64)))


def test_schedule_mismatch(tmp_path):
    cfg = tiny_cin_config()
    state = compvis_state_dict(cfg)
    cfg["model"]["params"]["linear_end"] = 0.012
    with pytest.raises(ModelLoadError, match="noise schedule does not match"):
        load_model(_save(tmp_path, state, cfg))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_that_executes_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil(str(marker))}}, f)
    p.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_cin_config()))
    with pytest.raises(ModelLoadError, match="refused"):
        load_model(p)
    assert not marker.exists(), "the pickle's code ran"


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "m.pt"
    torch.save([1, 2, 3], p)
    p.with_suffix(".yaml").write_text(yaml.safe_dump(tiny_cin_config()))
    with pytest.raises(ModelLoadError, match="state_dict"):
        load_model(p)


def test_unsupported_conditioning_and_options(tmp_path):
    cfg = tiny_cin_config()
    cfg["model"]["params"]["cond_stage_config"]["target"] = "ldm.modules.encoders.modules.BERTEmbedder"
    with pytest.raises(ModelLoadError, match="not supported"):
        load_model(_save(tmp_path, compvis_state_dict(tiny_cin_config()), cfg))
    cfg = tiny_cin_config(bogus_option=1)
    with pytest.raises(ModelLoadError, match="bogus_option"):
        load_model(_save(tmp_path, {}, cfg, "b.ckpt"))


def test_diffusers_conditional(tiny_diffusers_cond):
    m = load_model(tiny_diffusers_cond)
    f = m.facts
    assert f.family == "diffusers" and f.latent_shape == (3, 8, 8) and f.image_shape == (3, 16, 16)
    assert (f.conditioning.kind, f.conditioning.num_classes, f.conditioning.null_class) == ("class", 11, 10)
    assert m.first_stage is not None and m.unet.has_context


def test_diffusers_without_class_table_or_schedule(tiny_diffusers_cond, tmp_path):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(tiny_diffusers_cond, d)
    (d / "class_embedding.safetensors").unlink()
    with pytest.raises(UserError, match="class_embedding.safetensors"):
        load_model(d)
    with pytest.raises(UserError, match="--schedule"):
        load_model(d / "unet")


def test_text_conditioned_compvis_config_points_to_the_diffusers_route():
    from ptqd.models.compvis import parse_config
    from ptqd.models.tiny import tiny_cin_config

    cfg = tiny_cin_config()
    cfg["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    with pytest.raises(ModelLoadError, match="convert the checkpoint to a diffusers pipeline"):
        parse_config(cfg)
