"""Exact reproduction: a diffusers pipeline saved with its own scheduler, exported by ptqd, sampled by the CLI
(``ptqd sample --prompt P --latents L.npy --precision fp32``, in a process without torch) gives the pipeline's
own image for the same prompt, latents, steps and guidance."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ptqd import api
from ptqd.bundle import Bundle

# (what a user runs, scheduler class and config over the pipeline's, prediction type of the UNet)
CASES = {
    "sd1-dpm++2m": ("DPMSolverMultistepScheduler", {}, "epsilon"),
    "sd2-v-ddim": ("DDIMScheduler", {}, "v_prediction"),
    "sd1-pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "epsilon"),
    "sd1-euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "epsilon"),
    "sd2-v-euler-karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "v_prediction"),
    "sdxl-euler": ("EulerDiscreteScheduler", {}, "epsilon"),
}
PROMPT, NEGATIVE, STEPS, GUIDANCE = "a red cat on a photo", "the dog", 9, 5.0


@pytest.fixture(scope="module")
def base_pipeline(tmp_path_factory):
    from ptqd.models.tiny_sd import write_tiny_sd_pipeline

    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sdxl_pipeline(tmp_path_factory):
    from ptqd.models.tiny_sd import write_tiny_sdxl_pipeline

    return write_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


def with_scheduler(base, out, cls, config, prediction):
    shutil.copytree(base, out)
    f = out / "scheduler/scheduler_config.json"
    cfg = json.loads(f.read_text())
    f.write_text(json.dumps(dict(cfg, _class_name=cls, prediction_type=prediction, **config)))
    index = json.loads((out / "model_index.json").read_text())  # what save_pretrained writes for a new scheduler
    (out / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers", cls])))
    return out


NO_TORCH_SAMPLE = """
import sys
from ptqd.cli import main
code = main(sys.argv[1:])
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'diffusers'))
print('torch-side modules:', bad)
sys.exit(code or (3 if bad else 0))
"""


@pytest.mark.parametrize("case", list(CASES))
def test_ptqd_sample_reproduces_the_diffusers_pipeline(base_pipeline, sdxl_pipeline, tmp_path, case):
    import diffusers
    import torch

    cls, config, prediction = CASES[case]
    xl = case.startswith("sdxl")
    src = with_scheduler(sdxl_pipeline if xl else base_pipeline, tmp_path / case, cls, config, prediction)
    bundle = tmp_path / f"{case}.bundle"
    api.export(src, bundle, progress=False, prompts=["a red cat"])
    facts = Bundle.open(bundle).facts
    assert facts.sampler["class"] == cls
    latents = np.random.default_rng(7).standard_normal((2, *facts.latent_shape), dtype=np.float32)
    np.save(tmp_path / "L.npy", latents)
    out = tmp_path / "ours.npz"
    negative = [] if xl else ["--negative-prompt", NEGATIVE]
    r = subprocess.run([sys.executable, "-c", NO_TORCH_SAMPLE, "sample", str(bundle), "--prompt", PROMPT, *negative,
                        "--latents", str(tmp_path / "L.npy"), "--precision", "fp32",
                        "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    ours = np.load(out)["images"]

    if xl:  # no negative prompt: SDXL's zero negative embeddings (force_zeros_for_empty_prompt), ptqd's "" too
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(src, local_files_only=True)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, local_files_only=True, safety_checker=None,
                                                                 requires_safety_checker=False)
    assert type(pipe.scheduler).__name__ == cls
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe([PROMPT] * 2, negative_prompt=None if xl else [NEGATIVE] * 2, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE,
                  latents=torch.from_numpy(latents), output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert ours.shape == theirs.shape and ours.dtype == np.uint8
    print(f"{case}: max {diff.max()} mean {diff.mean():.4f}")
    assert diff.max() <= 2 and diff.mean() <= 0.5, (diff.max(), diff.mean())
    assert np.abs(ours[0].astype(np.int16) - ours[1]).max() > 10  # the latents matter


def test_a_sampler_override_changes_the_image_and_is_checked(base_pipeline, tmp_path):
    from ptqd.cli import main

    src = with_scheduler(base_pipeline, tmp_path / "p", "DPMSolverMultistepScheduler", {}, "epsilon")
    bundle = tmp_path / "p.bundle"
    api.export(src, bundle, progress=False, prompts=["a red cat"])
    a, _ = api.sample(bundle, prompts=[PROMPT], num=1, steps=6)
    b, _ = api.sample(bundle, prompts=[PROMPT], num=1, steps=6, sampler="euler-a")
    assert np.abs(a.astype(np.int16) - b).max() > 2
    assert main(["sample", str(bundle), "--sampler", "dpm++2m", "--eta", "1", "--prompt", "x"]) == 1
    np.save(tmp_path / "bad.npy", np.zeros((3, 4, 5, 5), np.float32))
    assert main(["sample", str(bundle), "--latents", str(tmp_path / "bad.npy"), "--prompt", "x"]) == 1
    (tmp_path / "text.npy").write_text("not numpy")
    assert main(["sample", str(bundle), "--latents", str(tmp_path / "text.npy"), "--prompt", "x"]) == 1


def test_sdxl_compiles_samples_w8a8_and_the_plan_and_evaluates(sdxl_pipeline, tmp_path):
    out = tmp_path / "xl.bundle"
    api.compile(sdxl_pipeline, out, precisions=("w8a8", "w4a8", "w4a4"), samples=4, steps=6, correction_samples=4, holdout=2,
                preset="minimal", progress=False, log=lambda m: None, prompts=["a red cat", "the dog on a photo"])
    import ptqd

    for precision in ("w8a8", "auto"):
        pipe = ptqd.Pipeline.from_bundle(out, precision=precision)
        images = pipe("a red cat", num_images_per_prompt=2, num_inference_steps=6, seed=1, output_type="np").images
        assert images.shape == (2, 16, 16, 3) and images.std() > 1
    rep = api.evaluate(out, precisions=("fp32", "w8a8", "auto"), num=4, steps=6, guidance=5.0, progress=False)
    rows = {r["precision"].split("+")[0]: r for r in rep["rows"]}
    assert rep["config"]["sampler"] == "euler"  # the pipeline's own
    assert set(rows) == {"fp32", "w8a8", "plan"}
    for p in ("w8a8", "plan"):  # tiny random weights: far from a trained model's quality, but finite and paired
        assert np.isfinite(rows[p]["psnr_vs_fp"]) and rows[p]["psnr_vs_fp"] > 10


def test_sdxl_size_conditioning_per_call_matches_diffusers(sdxl_pipeline, tmp_path):
    """original_size / crops_coords_top_left / target_size reach the exported UNet per call (they ride in the
    context's pooled token): the same sizes give diffusers' own image, and other sizes give another image."""
    import diffusers
    import torch

    import ptqd
    from ptqd.errors import UserError

    bundle = tmp_path / "xl.bundle"
    api.export(sdxl_pipeline, bundle, progress=False, prompts=["a red cat"])
    facts = Bundle.open(bundle).facts
    latents = np.random.default_rng(3).standard_normal((1, *facts.latent_shape), dtype=np.float32)
    sizes = dict(original_size=(40, 24), crops_coords_top_left=(6, 2), target_size=(12, 20))
    pipe = ptqd.Pipeline.from_bundle(bundle, precision="fp32")
    call = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents, output_type="np")
    ours = pipe(PROMPT, **call, **sizes).images
    default = pipe(PROMPT, **call).images
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=torch.from_numpy(latents),
                 output_type="np", **sizes).images
    theirs = (theirs * 255).round().astype(np.uint8)
    diff = np.abs(ours.astype(np.int16) - theirs)
    assert diff.max() <= 2 and diff.mean() <= 0.5, (diff.max(), diff.mean())
    assert np.abs(default.astype(np.int16) - ours).max() > 4  # the sizes matter: a test that can fail
    # the CLI takes them too, and bad values are refused in one line
    from ptqd.cli import main

    np.save(tmp_path / "L.npy", latents)
    out = tmp_path / "cli.npz"
    assert main(["sample", str(bundle), "--prompt", PROMPT, "--latents", str(tmp_path / "L.npy"), "--precision",
                 "fp32", "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--original-size", "40,24",
                 "--crop-top-left", "6,2", "--target-size", "12,20", "--out", str(out)]) == 0
    np.testing.assert_array_equal(np.load(out)["images"], ours)
    assert main(["sample", str(bundle), "--prompt", "x", "--original-size", "40"]) == 1
    with pytest.raises(UserError, match="target_size: expected two positive numbers"):
        pipe(PROMPT, num_inference_steps=2, target_size=(0, 16))


def test_size_conditioning_is_refused_where_the_model_has_none(base_pipeline, tmp_path):
    import ptqd
    from ptqd.errors import UserError

    bundle = tmp_path / "sd.bundle"
    api.export(base_pipeline, bundle, progress=False, prompts=["a red cat"])
    with pytest.raises(UserError, match="original_size: only an SDXL bundle"):
        ptqd.Pipeline.from_bundle(bundle)(PROMPT, num_inference_steps=2, original_size=(32, 32))
