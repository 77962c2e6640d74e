"""The numpy DDIM sampler against diffusers' DDIMScheduler, and the runtime's torch-freedom."""

import subprocess
import sys

import numpy as np
import pytest

from ptqd.facts import NoiseSchedule
from ptqd.runtime.sampler import DDIMSampler, NoiseSource

SCHED = NoiseSchedule("scaled_linear", 1000, 0.0015, 0.0195)


def test_compvis_spacing():
    s = DDIMSampler(SCHED.alphas_cumprod)
    s.set_timesteps(20)
    assert s.timesteps.tolist() == list(range(951, 0, -50))


def _fake_eps(x, t):
    # the ideal denoiser for unit-variance data, √(1-ᾱ_t)·x, plus a smooth nonlinearity: keeps latents O(1)
    return (np.sqrt(1 - SCHED.alphas_cumprod[t]) * x + 0.05 * np.tanh(3 * x)).astype(np.float32)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [20, 7])
def test_trajectory_equals_diffusers_ddim(eta, steps):
    import torch
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(steps)
    ours = DDIMSampler(SCHED.alphas_cumprod)
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    noise = NoiseSource(0, np.arange(3), (3, 8, 8))
    x = noise.draw()
    xr = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        z = noise.draw()
        x, _ = ours.step(_fake_eps(x, t), int(t), x, eta, z if eta > 0 else None)
        e = torch.from_numpy(_fake_eps(xr.numpy(), t))
        xr = ref.step(e, int(t), xr, eta=eta, variance_noise=torch.from_numpy(z) if eta > 0 else None).prev_sample
        np.testing.assert_allclose(x, xr.numpy(), atol=1e-5, rtol=0)


def test_noise_is_per_sample_not_per_batch():
    a = NoiseSource(3, np.arange(4), (2, 2)).draw()
    b = NoiseSource(3, np.array([2, 3]), (2, 2)).draw()
    np.testing.assert_array_equal(a[2:], b)
    assert not np.allclose(a[0], NoiseSource(4, np.arange(1), (2, 2)).draw()[0])


def test_eta_needs_noise():
    s = DDIMSampler(SCHED.alphas_cumprod)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="noise"):
        s.step(np.zeros((1, 1, 2, 2), np.float32), int(s.timesteps[0]), np.zeros((1, 1, 2, 2), np.float32), 1.0)


def test_import_runtime_does_not_import_torch():
    code = "import sys, ptqd.runtime; print(' '.join(sys.modules))"
    mods = {m.split('.')[0] for m in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                     check=True).stdout.split()}
    assert "torch" not in mods and "onnxruntime" not in mods
