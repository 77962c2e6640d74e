"""Model definitions and loaders (torch). Every loader returns a :class:`LoadedModel`."""

from __future__ import annotations

from pathlib import Path

from ptqd.errors import UserError
from ptqd.facts import NoiseSchedule
from ptqd.models.loaded import EpsModel, LoadedModel

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")

__all__ = ["EpsModel", "LoadedModel", "load_model", "find_compvis_config"]


def find_compvis_config(checkpoint: Path) -> Path | None:
    """CompVis model-zoo layout keeps ``config.yaml`` beside ``model.ckpt``; also try ``<stem>.yaml``."""
    for cand in (checkpoint.with_suffix(".yaml"), checkpoint.parent / "config.yaml"):
        if cand.exists():
            return cand
    return None


def load_model(source: str | Path, config: str | Path | dict | None = None, schedule: NoiseSchedule | None = None,
               with_first_stage: bool = True) -> LoadedModel:
    """Load ``source``: ``"demo"``, a diffusers directory, or a CompVis checkpoint (``config`` = its YAML)."""
    if str(source) == "demo":
        return load_demo(with_first_stage)
    path = Path(source)
    if not path.exists():
        raise UserError(f"model not found: {path} (expected a diffusers directory or a CompVis .ckpt/.safetensors)")
    if path.is_dir():
        from ptqd.models.diffusers_loader import is_diffusers_dir, load_diffusers

        if not is_diffusers_dir(path):
            raise UserError(f"{path} is a directory but not a diffusers model (no config.json or unet/config.json)")
        return load_diffusers(path, schedule=schedule, with_first_stage=with_first_stage)
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(f"{path.name}: unknown model format; expected a directory (diffusers) or one of "
                        f"{', '.join(CHECKPOINT_SUFFIXES)} (CompVis checkpoint with --config)")
    from ptqd.models.compvis import load_compvis

    if config is None:
        config = find_compvis_config(path)
        if config is None:
            raise UserError(f"{path.name} is a CompVis checkpoint: pass its YAML with --config "
                            "(e.g. configs/latent-diffusion/cin256-v2.yaml)")
    return load_compvis(path, config, with_first_stage=with_first_stage)


def load_demo(with_first_stage: bool = True) -> LoadedModel:
    """The shipped demo LDM (a CompVis-layout checkpoint trained by ``ptqd train-demo``)."""
    import dataclasses

    from ptqd.models.compvis import load_compvis
    from ptqd.models.demo import demo_dir

    d = demo_dir()
    ckpt = d / "demo_ldm.safetensors"
    if not ckpt.exists():
        raise UserError(f"the demo weights are missing from {d}: reinstall ptqd, or run `ptqd train-demo`")
    loaded = load_compvis(ckpt, d / "demo_ldm.yaml", with_first_stage=with_first_stage)
    loaded.facts = dataclasses.replace(loaded.facts, family="demo", source="ptqd demo (digits)")
    return loaded
