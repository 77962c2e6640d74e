"""Our CompVis UNet and decoder compute what the CompVis reference code computes.

``tests/data/compvis_golden.npz`` holds outputs of the reference implementation
(``ldm/modules/diffusionmodules/openaimodel.py`` + ``ldm/modules/attention.py`` and
``ldm/modules/diffusionmodules/model.py::Decoder`` at CompVis/latent-diffusion a506df5) for
tiny configs covering the options the latent-diffusion configs use. The weights are not
stored: ``seeded_state_dict(model, seed)`` regenerates them from a numpy seed, identical on
every platform. The reference itself is not part of this repository.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqd.models.compvis import parse_config
from ptqd.models.compvis_unet import UNetModel
from ptqd.models.first_stage import DecoderConfig, FirstStageDecoder
from ptqd.models.tiny import seeded_state_dict

GOLDEN = np.load(Path(__file__).parent.parent / "data" / "compvis_golden.npz")
META = json.loads(str(GOLDEN["meta"]))


@pytest.mark.parametrize("case", [k for k in META if "config" in META[k]])
def test_unet_matches_reference(case):
    ucfg, *_ = parse_config(META[case]["config"])
    model = UNetModel(ucfg).eval()
    model.load_state_dict(seeded_state_dict(model, META[case]["seed"]))
    args = [torch.from_numpy(GOLDEN[f"{case}/x"]), torch.from_numpy(GOLDEN[f"{case}/t"])]
    ctx = torch.from_numpy(GOLDEN[f"{case}/context"]) if f"{case}/context" in GOLDEN else None
    with torch.no_grad():
        out = model(*args, context=ctx).numpy()
    ref = GOLDEN[f"{case}/ref"]
    assert ref.std() > 0.1
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["decoder", "decoder_attn"])
def test_decoder_matches_reference(case):
    cfg = DecoderConfig.from_params("ldm.models.autoencoder.AutoencoderKL", {"embed_dim": 3, "ddconfig": META[case]["ddconfig"]})
    dec = FirstStageDecoder(cfg).eval()
    dec.load_state_dict(seeded_state_dict(dec, META[case]["seed"]))
    with torch.no_grad():
        out = dec(torch.from_numpy(GOLDEN[f"{case}/z"])).numpy()
    np.testing.assert_allclose(out, GOLDEN[f"{case}/ref"], atol=2e-5, rtol=0)


def test_vq_head_picks_nearest_codebook_entry():
    from ptqd.models.first_stage import VectorQuantizer

    vq = VectorQuantizer(16, 3)
    vq.embedding.weight.data = torch.from_numpy(np.random.RandomState(0).standard_normal((16, 3)).astype(np.float32))
    z = torch.from_numpy(np.random.RandomState(1).standard_normal((2, 3, 4, 4)).astype(np.float32))
    with torch.no_grad():
        zq = vq(z).numpy()
        e = vq.embedding.weight.numpy()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    brute = e[np.argmin(((flat[:, None, :] - e[None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_allclose(zq.transpose(0, 2, 3, 1).reshape(-1, 3), brute, atol=1e-6)


def test_full_size_cin256_v2_has_paper_parameter_count():
    from ptqd.models.compvis import CIN256_V2

    ucfg, *_ = parse_config(CIN256_V2)
    with torch.device("meta"):
        model = UNetModel(ucfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - 400.9) < 0.1, n
