"""Sampling through the API and runners, on the tiny CompVis bundle (ORT FP32 vs a torch reference)."""

import numpy as np
import pytest

from ptqd import api
from ptqd.errors import UserError
from ptqd.tools.metrics import evaluate_runners, frechet_distance, psnr
from ptqd.runtime import OrtDecoder, OrtRunner, SamplerConfig, sample_latents


def test_sample_npz_png_and_pairing(tiny_cin_bundle, tmp_path):
    imgs, labels = api.sample(tiny_cin_bundle, classes=[0, 1, 2], num=5, seed=0, steps=5, out=tmp_path / "s.npz",
                              progress=False)
    assert imgs.shape == (5, 16, 16, 3) and imgs.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 0, 1]
    data = np.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(data["images"], imgs)
    again, _ = api.sample(tiny_cin_bundle, classes=[0, 1, 2], num=5, seed=0, steps=5, batch=2, progress=False)
    np.testing.assert_array_equal(again, imgs)  # batching does not change sample i
    other, _ = api.sample(tiny_cin_bundle, classes=[0, 1, 2], num=5, seed=1, steps=5, progress=False)
    assert not np.array_equal(other, imgs)
    api.sample(tiny_cin_bundle, classes=[3], num=2, steps=3, out=tmp_path / "g.png", progress=False)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size[0] > 16


def test_sample_bad_input(tiny_cin_bundle, tmp_path):
    with pytest.raises(UserError, match="out of range"):
        api.sample(tiny_cin_bundle, classes=[99], num=1, progress=False)
    with pytest.raises(UserError, match="no w4a4 engine"):
        api.sample(tiny_cin_bundle, precision="w4a4", num=1, progress=False)
    with pytest.raises(UserError, match=".png"):
        api.sample(tiny_cin_bundle, num=1, out=tmp_path / "x.jpg", progress=False)
    with pytest.raises(UserError, match="--eta"):
        api.sample(tiny_cin_bundle, num=1, eta=2.0, progress=False)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ort_trajectory_matches_torch(tiny_cin_ckpt, tiny_cin_bundle, eta):
    from ptqd.bundle import Bundle
    from ptqd.models import load_model
    from ptqd.engines.torch_ref import TorchRunner

    loaded = load_model(tiny_cin_ckpt)
    b = Bundle.open(tiny_cin_bundle)
    cfg = SamplerConfig(steps=10, eta=eta, guidance=3.0)
    labels, idx = np.array([0, 5, 10]), np.arange(3)
    a = sample_latents(OrtRunner(b.path("unet.onnx")), b.facts, loaded.class_embedding, labels, idx, 0, cfg)
    t = sample_latents(TorchRunner(loaded.unet), b.facts, loaded.class_embedding, labels, idx, 0, cfg)
    assert np.abs(a).max() > 0.1 and np.abs(a - t).max() < 1e-3


class Noisy:
    """A deliberately worse engine: FP plus a fixed perturbation of the noise prediction."""

    def __init__(self, runner, scale):
        self.runner, self.scale = runner, scale

    def __call__(self, x, t, c=None):
        e = self.runner(x, t, c)
        return e + self.scale * np.sin(7 * e)


def test_eval_rows_separate_good_and_bad_engines(tiny_cin_bundle):
    from ptqd.bundle import Bundle

    b = Bundle.open(tiny_cin_bundle)
    fp = OrtRunner(b.path("unet.onnx"))
    runners = {"fp32": fp, "slightly": Noisy(fp, 0.01), "badly": Noisy(fp, 0.3)}
    table = np.load(b.path("cond/class_embedding.npy"))
    res = evaluate_runners(b.facts, table, runners, OrtDecoder(b.path("first_stage.onnx")), np.arange(6) % 10, 0,
                           SamplerConfig(steps=6, guidance=2.0), batch=4)
    rows = {r["precision"]: r for r in res.rows}
    assert rows["slightly"]["psnr_vs_fp"] > rows["badly"]["psnr_vs_fp"]
    assert 0 < rows["slightly"]["eps_mse_mean"] < rows["badly"]["eps_mse_mean"]
    assert len(rows["badly"]["eps_mse"]) == 6


def test_frechet_distance_and_psnr():
    rng = np.random.RandomState(0)
    f = rng.standard_normal((2000, 4))
    assert frechet_distance(f, f) < 1e-6
    g = f + np.array([3.0, 0, 0, 0])
    assert abs(frechet_distance(f, g) - 9.0) < 1e-6
    a = np.zeros((2, 4, 4, 1), np.uint8)
    b = a.copy()
    b[1] += 255
    p = psnr(a, b)
    assert np.isinf(p[0]) and abs(p[1]) < 1e-9
