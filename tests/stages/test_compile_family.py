"""`ptqd compile` on a cin256-v2-family UNet (the paper's architecture, scaled down): every engine validated,
each stage's time and peak memory recorded. The 47 M and full-size runs are benchmarks/scale.py."""

import numpy as np

from ptqd import api
from ptqd.bundle import Bundle


def test_small_cin256_family_compiles_with_every_engine_validated(tmp_path):
    from ptqd.models.tiny import write_cin256_family

    ckpt = write_cin256_family(tmp_path / "small.safetensors", "small")
    log = []
    res = api.compile(str(ckpt), tmp_path / "b", precisions=("w8a8", "w4a8", "w4a4"), preset="minimal",
                      progress=False, log=log.append)
    b = Bundle.open(tmp_path / "b")
    assert b.facts.latent_shape == [3, 16, 16] or tuple(b.facts.latent_shape) == (3, 16, 16)
    built = b.read_json("engines/onnxruntime/build.json")
    assert set(built) == {"w8a8", "w4a8", "w4a4"}
    for p, r in built.items():
        v = r["validation_vs_fake_quant"]
        assert v["passed"] and v["kernels"]["passed"] and v["kernels"]["kernels"] > 50, (p, v.get("failure"))
    costs = b.stage("compile")["stages"]
    assert list(costs) == ["export", "calibrate", "build", "correct", "plan"]
    assert all(c["seconds"] >= 0 and c["peak_rss_mb"] > 0 for c in costs.values())
    assert all("peak RSS" in line for line in log)
    cal = b.stage("calibrate")
    assert cal["preset"] == "minimal" and cal["device"].startswith("cpu")
    assert cal["config"]["samples"] == 4 and cal["config"]["steps"] == 10
    assert len(res["plan"]) == 10
    assert b.read_json("calib/correction.json")["config"]["holdout"] == 1
    # 4-bit weights really sit on the 4-bit grid, 8-bit ones on the reduce-range grid
    w4 = np.load(b.path("calib/w4a8.npz"))
    meta = b.read_json("calib/w4a8.json")["layers"]
    body = [m["index"] for m in meta if m["w_bits"] == 4]
    assert body and max(int(np.abs(w4[f"{i}.w_int"]).max()) for i in body) <= 7
