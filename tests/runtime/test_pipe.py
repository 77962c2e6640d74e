"""``ptqd.Pipeline``: a bundle loaded once and called like a diffusers pipeline, safe from several threads."""

import threading

import numpy as np
import pytest

import ptqd
from ptqd import api
from ptqd.errors import UserError


def test_pipeline_equals_the_cli_sample_and_returns_pil(compiled):
    bundle = compiled[0]
    pipe = ptqd.Pipeline.from_bundle(bundle)  # precision auto: the bundle's plan
    assert pipe.label.startswith("plan")
    out = pipe(class_labels=[1, 7], num_images_per_prompt=2, num_inference_steps=5, seed=3, output_type="np")
    want, labels = api.sample(bundle, classes=[1, 1, 7, 7], num=4, seed=3, steps=5, precision="auto")
    assert out.labels.tolist() == labels.tolist() == [1, 1, 7, 7]
    np.testing.assert_array_equal(out.images, want)
    pil = pipe(class_labels=3, num_inference_steps=3, seed=0).images
    assert len(pil) == 1 and pil[0].size == want.shape[1:3][::-1]
    auto_seed = pipe(class_labels=3, num_inference_steps=2)
    assert 0 <= auto_seed.seed < 2**31  # drawn, and reported so the image can be made again


def test_two_threads_get_what_two_sequential_calls_get(compiled):
    pipe = ptqd.Pipeline.from_bundle(compiled[0], precision="w4a8")
    calls = [dict(class_labels=[2, 5, 9], seed=11, num_inference_steps=6, output_type="np", batch=2),
             dict(class_labels=[4], num_images_per_prompt=3, seed=12, num_inference_steps=4, output_type="np",
                  eta=1.0)]
    sequential = [pipe(**c).images for c in calls]
    got = [None, None]
    barrier = threading.Barrier(2)

    def run(k):
        barrier.wait()
        for _ in range(2):
            got[k] = pipe(**calls[k]).images

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        np.testing.assert_array_equal(got[k], sequential[k])
    assert not np.array_equal(sequential[0][:1], sequential[1][:1])


def test_text_pipeline_prompts_and_latents(tmp_path):
    from ptqd.models.tiny_sd import write_tiny_sd_pipeline

    src = write_tiny_sd_pipeline(tmp_path / "sd")
    bundle = tmp_path / "sd.bundle"
    api.export(src, bundle, progress=False, prompts=["a red cat"])
    pipe = ptqd.Pipeline.from_bundle(bundle, precision="auto")  # no plan yet: FP32
    assert pipe.label == "fp32"
    out = pipe("a red cat", negative_prompt="the dog", num_images_per_prompt=2, num_inference_steps=4,
               guidance_scale=4.0, seed=5, output_type="np")
    want, _ = api.sample(bundle, prompts=["a red cat"], negative_prompt="the dog", num=2, steps=4, guidance=4.0,
                         seed=5)
    np.testing.assert_array_equal(out.images, want)
    lat = np.random.default_rng(0).standard_normal((2, 4, 8, 8), dtype=np.float32)
    a = pipe(["a red cat", "the dog"], num_inference_steps=3, latents=lat, output_type="np").images
    b = pipe(["a red cat", "the dog"], num_inference_steps=3, latents=lat, seed=99, output_type="np").images
    np.testing.assert_array_equal(a, b)  # deterministic sampler: the latents alone decide
    with pytest.raises(UserError, match="latents: expected shape"):
        pipe("a red cat", latents=lat)
    with pytest.raises(UserError, match="class_labels"):
        pipe("a red cat", class_labels=[1])
    with pytest.raises(UserError, match="one negative prompt"):
        pipe(["a", "b"], negative_prompt=["x", "y"])
    with pytest.raises(UserError, match="output_type"):
        pipe("a", output_type="pt")


def test_class_pipeline_refuses_prompts(compiled):
    pipe = ptqd.Pipeline.from_bundle(compiled[0], precision="fp32")
    with pytest.raises(UserError, match="give class_labels="):
        pipe("a red cat")
    with pytest.raises(UserError, match="class labels|out of range"):
        pipe(class_labels=[10**6])
