"""Calibrate + build on the demo bundle: every engine matches its fake-quant model, and a perturbed
Q/DQ scale is caught.

The demo (a trained model) rather than a random tiny one: engines and fake quant differ only by
rare 1-LSB flips where a requantized conv output lands on a rounding tie (float accumulation order
differs); a trained network carries those along, an untrained random one amplifies them chaotically.
"""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ptqd import api
from ptqd.bundle import Bundle
from ptqd.errors import UserError


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("q") / "demo.bundle"
    api.export("demo", d, progress=False)
    with pytest.raises(UserError, match="not calibrated"):
        api.build(d, progress=False)
    api.calibrate(d, samples=10, steps=10, progress=False)
    recs = api.build(d, progress=False)
    return d, recs


def test_engines_match_fake_quant_and_run_on_integer_kernels(built):
    d, recs = built
    assert set(recs) == {"w8a8", "w4a8", "w4a4", "ort-int8"}
    for p in ("w8a8", "w4a8", "w4a4"):
        v = recs[p]["validation_vs_fake_quant"]
        assert v["passed"] and v["median_rel_l2"] <= api.ENGINE_TOLERANCE["median_rel_l2"], (p, v)
        assert recs[p]["integer_mac_share"] >= 0.85, recs[p]
        assert recs[p]["integer_kernel_ops"].get("QLinearConv", 0) > 0
    b = Bundle.open(d)
    build = b.read_json("engines/onnxruntime/build.json")
    assert "4-bit grid" in build["w4a4"]["numerics"] and build["w8a8"]["onnxruntime"]
    # quantized weights really sit on their grids
    meta = b.read_json("calib/w4a8.json")
    arrays = np.load(b.path("calib/w4a8.npz"))
    body = [m for m in meta["layers"] if m["w_bits"] == 4]
    assert body and all(np.abs(arrays[f"{m['index']}.w_int"]).max() <= 7 for m in body)
    assert all(m["act_in"]["bits"] == 4 for m in b.read_json("calib/w4a4.json")["layers"] if m["w_bits"] == 4)


def test_engines_sample(built, tmp_path):
    d, _ = built
    fp, _ = api.sample(d, num=3, steps=4, progress=False)
    for p in ("w8a8", "ort-int8"):
        q, _ = api.sample(d, num=3, steps=4, precision=p, progress=False)
        assert q.shape == fp.shape


def test_perturbed_qdq_scale_is_caught(built, tmp_path):
    """Double one activation scale in the w8a8 QDQ graph: validation against fake-quant must fail."""
    from ptqd.calib.calibrate import load_params
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.onnxruntime import build_engine
    from ptqd.runtime.runners import OrtRunner
    from ptqd.runtime.torch_runner import TorchRunner

    d, _ = built
    b = Bundle.open(d)
    model = onnx.load(str(b.path("engines/onnxruntime/w8a8.qdq.onnx")))
    target = next(i for i in model.graph.initializer if i.name.endswith("_x_scale") and "middle_block_0" in i.name)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * 2, target.name))
    onnx.save(model, str(tmp_path / "bad.qdq.onnx"))
    build_engine(tmp_path / "bad.qdq.onnx", tmp_path / "bad.onnx")
    layers = load_params(b.read_json("calib/w8a8.json"), np.load(b.path("calib/w8a8.npz")))
    ref = TorchRunner(fake_quant_model(api._load_source(b).unet, layers))
    inputs = api.validation_inputs(b)
    good = api.validate_engine(OrtRunner(b.path("engines/onnxruntime/w8a8.onnx")), ref, inputs)
    bad = api.validate_engine(OrtRunner(tmp_path / "bad.onnx"), ref, inputs)
    assert good["passed"] and not bad["passed"]
    assert bad["median_rel_l2"] > 10 * api.ENGINE_TOLERANCE["median_rel_l2"]


def test_tensorrt_backend_without_tensorrt(built):
    from ptqd.errors import MissingDependencyError

    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(MissingDependencyError, match="pip install"):
        api.build(built[0], backend="tensorrt", progress=False)


def test_timestep_buckets_build_one_engine_each_and_switch_by_t(tmp_path):
    from ptqd.runtime.runners import BucketedRunner

    d = tmp_path / "demo.bundle"
    api.export("demo", d, progress=False, validate=False)
    rec = api.calibrate(d, samples=4, steps=6, buckets=2, progress=False)
    assert [bk["steps"] for bk in rec["buckets"]] == [[0, 1, 2], [3, 4, 5]]
    assert rec["buckets"][0]["t_range"] == [499, 831] and rec["buckets"][1]["t_range"] == [1, 333]
    b = Bundle.open(d)
    assert b.has("calib/w8a8.b0.json") and b.has("calib/w8a8.b1.npz") and not b.has("calib/w8a8.json")
    lo = b.read_json("calib/w8a8.b1.json")["layers"]
    hi = b.read_json("calib/w8a8.b0.json")["layers"]
    assert any(a["act_in"] != c["act_in"] for a, c in zip(lo, hi)), "buckets should differ in activation ranges"
    recs = api.build(d, precisions=("w8a8",), progress=False)
    assert [e["engine"] for e in recs["w8a8"]["buckets"]] == ["engines/onnxruntime/w8a8.b0.onnx",
                                                            "engines/onnxruntime/w8a8.b1.onnx"]
    assert all(e["validation_vs_fake_quant"]["passed"] for e in recs["w8a8"]["buckets"])
    runner = api.open_engine(Bundle.open(d), "w8a8")
    assert isinstance(runner, BucketedRunner)
    assert runner.pick(900.0) is runner.pick(600.0) is not runner.pick(100.0)
    imgs, _ = api.sample(d, num=2, steps=6, precision="w8a8", progress=False)
    assert imgs.shape == (2, 32, 32, 1)
    # recalibrating replaces the calibration whole and drops the engines built from the old one
    api.calibrate(d, samples=4, steps=6, buckets=1, progress=False)
    b = Bundle.open(d)
    assert not any(".b0." in f or ".b1." in f for f in b.files) and b.stage("build") is None
    with pytest.raises(UserError, match="no w8a8 engine"):
        api.open_engine(b, "w8a8")
