"""ptqd's numpy samplers against diffusers' own schedulers, step by step on the same inputs: the timesteps
the UNet sees, the scaled model input, and the whole trajectory (within 1e-5)."""

import numpy as np
import pytest

from ptqd.errors import UserError
from ptqd.facts import NoiseSchedule
from ptqd.runtime.schedulers import make_scheduler, resolve

SCHED = NoiseSchedule("scaled_linear", 1000, 0.00085, 0.012)  # Stable Diffusion's
BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
      "skip_prk_steps": True}

# (diffusers class, its config beyond the betas): every sampler ptqd names, on the configs pipelines ship
CASES = [
    ("DDIMScheduler", SD),
    ("DDIMScheduler", {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}),
    ("DDIMScheduler", {"timestep_spacing": "linspace", "clip_sample": False}),
    ("PNDMScheduler", SD),
    ("PNDMScheduler", {"timestep_spacing": "trailing", "skip_prk_steps": True}),
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "use_karras_sigmas": True}),
    ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", SD),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}),
    ("EulerAncestralDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", SD),
]


def _fake_eps(x, t):
    """A smooth stand-in for a UNet: ε depends on the (scaled) input and on t, keeps the latents O(1)."""
    a = SCHED.alphas_cumprod[int(min(max(round(float(t)), 0), 999))]
    return (np.sqrt(1 - a) * x + 0.05 * np.tanh(3 * x) + 1e-4 * float(t)).astype(np.float32)


def _diffusers(cls, config):
    import diffusers

    return getattr(diffusers, cls).from_config({**BASE, **config})  # keys the class does not know are dropped


@pytest.mark.parametrize("steps", [20, 7])
@pytest.mark.parametrize("cls,config", CASES, ids=[f"{c}-{'-'.join(f'{k}={v}' for k, v in d.items())}"
                                                   for c, d in CASES])
def test_trajectory_equals_diffusers(cls, config, steps, monkeypatch):
    import torch

    ref = _diffusers(cls, config)
    ref.set_timesteps(steps)
    spec = resolve({"class": cls, "config": dict(ref.config)})
    ours = make_scheduler(SCHED.alphas_cumprod, spec)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy().astype(np.float64), rtol=0, atol=1e-3)
    assert abs(ours.init_noise_sigma - float(ref.init_noise_sigma)) < 1e-4 * max(1.0, float(ref.init_noise_sigma))

    rng = np.random.default_rng(0)
    noises = [rng.standard_normal((2, 4, 8, 8), dtype=np.float32) for _ in range(len(ours.timesteps))]
    if ours.stochastic:  # diffusers draws its own noise: hand it ours
        import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea

        queue = list(noises)
        monkeypatch.setattr(ea, "randn_tensor", lambda *a, **k: torch.from_numpy(queue.pop(0)))
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32) * np.float32(ours.init_noise_sigma)
    xr = torch.from_numpy(x.copy())
    for i, t in enumerate(ref.timesteps):
        xin = ours.scale_model_input(x, i)
        xin_ref = ref.scale_model_input(xr, t).numpy()
        np.testing.assert_allclose(xin, xin_ref, rtol=0, atol=1e-5)
        x = ours.step(_fake_eps(xin, ours.timesteps[i]), i, x, noises[i] if ours.stochastic else None)
        xr = ref.step(torch.from_numpy(_fake_eps(xin_ref, float(t))), t, xr).prev_sample
        # within 1e-5 of the sample's scale (σ-space samples start at std σ_max ≈ 15: float32 rounding there is 2e-6)
        scale = max(1.0, float(np.abs(xr.numpy()).max()) / 4)
        np.testing.assert_allclose(x, xr.numpy(), rtol=0, atol=1e-5 * scale, err_msg=f"step {i}, t = {float(t)}")
    assert np.isfinite(x).all() and np.abs(x).max() < 10


def test_override_takes_the_pipelines_spacing_as_from_config_does():
    import diffusers

    sd = _diffusers("PNDMScheduler", SD)
    for name, cls in [("dpm++2m-karras", "DPMSolverMultistepScheduler"), ("euler", "EulerDiscreteScheduler"),
                      ("euler-a", "EulerAncestralDiscreteScheduler")]:
        spec = resolve({"class": "PNDMScheduler", "config": dict(sd.config)}, name)
        ref = getattr(diffusers, cls).from_config(sd.config, **({"use_karras_sigmas": True} if "karras" in name else {}))
        ref.set_timesteps(10)
        ours = make_scheduler(SCHED.alphas_cumprod, spec)
        ours.set_timesteps(10)
        assert spec.name == name
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=1e-3)


def test_a_saved_dpm_config_is_strict_json_and_resolves(tmp_path):
    """diffusers saves DPM-Solver's "no clipping" as lambda_min_clipped: -Infinity, which strict JSON refuses."""
    import json

    from ptqd.runtime.schedulers import clean_config

    _diffusers("DPMSolverMultistepScheduler", {}).save_config(tmp_path)
    raw = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert raw["lambda_min_clipped"] == -float("inf")
    cfg = clean_config(raw)
    json.dumps(cfg, allow_nan=False)
    assert resolve({"class": "DPMSolverMultistepScheduler", "config": cfg}).name == "dpm++2m"


def test_compvis_bundles_sample_with_compvis_ddim():
    s = make_scheduler(SCHED.alphas_cumprod, resolve(None))
    s.set_timesteps(20)
    assert s.timesteps.tolist() == list(range(951, 0, -50))


@pytest.mark.parametrize("config,match", [
    ({"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    ({"solver_order": 3}, "solver_order"),
    ({"use_lu_lambdas": True}, "use_lu_lambdas"),
])
def test_unsupported_configs_are_named(config, match):
    with pytest.raises(UserError, match=match):
        resolve({"class": "DPMSolverMultistepScheduler", "config": config})


def test_unknown_sampler_and_eta_on_a_deterministic_sampler():
    with pytest.raises(UserError, match="--sampler 'lms'"):
        resolve(None, "lms")
    with pytest.raises(UserError, match="η is DDIM's"):
        make_scheduler(SCHED.alphas_cumprod, resolve(None, "dpm++2m"), eta=1.0)
    with pytest.raises(UserError, match="not one ptqd reproduces"):
        resolve({"class": "LMSDiscreteScheduler", "config": {}})


def test_euler_ancestral_vsc_keeps_the_total_noise():
    """With residual noise r in ε, the fresh noise shrinks so that (σ_down − σ)²·r² + σ_up′² = σ_up²."""
    s = make_scheduler(SCHED.alphas_cumprod, resolve(None, "euler-a"))
    s.set_timesteps(10)
    x = np.zeros((1, 1, 1, 1), np.float32)
    eps = np.zeros_like(x)
    z = np.ones_like(x)
    i, r = 3, 0.2
    plain = float(s.step(eps, i, x, z)[0, 0, 0, 0])  # = σ_up
    vsc = float(s.step(eps, i, x, z, residual_std=r)[0, 0, 0, 0])
    sig, nxt = s.sigmas[i], s.sigmas[i + 1]
    down = np.sqrt(nxt**2 - plain**2)
    assert 0 < vsc < plain
    np.testing.assert_allclose(vsc**2 + (down - sig) ** 2 * r**2, plain**2, rtol=1e-4)
