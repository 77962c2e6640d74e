"""The OpenVINO backend: exact i4 weight storage, engines built from the calibration and validated,
the runtime sampling through them close to the ONNX Runtime engines, and clear errors."""

import shutil
import sys

import numpy as np
import onnx
import pytest

from tests.engines.test_packed import _conv_model

ov = pytest.importorskip("openvino")


def _run(model, x):
    cm = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return cm({0: x})[cm.output(0)]


@pytest.mark.parametrize("w_range, packed", [(7, 1), (63, 0)])
def test_i4_storage_is_exact_and_only_where_the_values_fit(tmp_path, w_range, packed):
    from ptqd.engines.openvino import convert_qdq, engine_bytes, read_engine

    w = np.random.RandomState(0).randint(-w_range, w_range + 1, size=(16, 8, 3, 3)).astype(np.int8)
    onnx.save(_conv_model(w), tmp_path / "g.qdq.onnx")
    rec = convert_qdq(tmp_path / "g.qdq.onnx", tmp_path / "g.xml.gz")
    assert rec["i4_constants"] == packed
    assert rec["files"] == ["g.xml.gz", "g.bin"] and not (tmp_path / "g.xml").exists()
    size = (tmp_path / "g.bin").stat().st_size  # weights, plus scales and zero points (~150 bytes)
    assert size < w.size // 2 + 256 if packed else size >= w.size  # 4-bit weights: half a byte each
    x = np.random.RandomState(1).randn(1, 8, 8, 8).astype(np.float32)
    core = ov.Core()
    ours = _run(read_engine(core, tmp_path / "g.xml.gz"), x)
    plain = _run(core.read_model(str(tmp_path / "g.qdq.onnx")), x)
    assert np.array_equal(ours, plain)  # packing changes the storage, not one bit of the output
    assert engine_bytes(tmp_path / "g.xml.gz") == (tmp_path / "g.xml.gz").stat().st_size + \
        (tmp_path / "g.bin").stat().st_size


@pytest.fixture(scope="module")
def ov_bundle(compiled, tmp_path_factory):
    """A copy of the compiled demo bundle with OpenVINO engines built (every precision validated)."""
    from ptqd import api

    out = tmp_path_factory.mktemp("ov") / "demo.bundle"
    shutil.copytree(compiled[0], out)
    recs = api.build(out, backend="openvino", progress=False)
    return out, recs


def test_build_validates_every_precision_and_stores_4bit_weights_packed(ov_bundle):
    from ptqd.bundle import Bundle, layout
    from ptqd.resources import has_amx_int8

    out, recs = ov_bundle
    assert set(recs) == {"w8a8", "w4a8", "w4a4"}
    for p, r in recs.items():
        v = r["validation_vs_fake_quant"]
        assert v["passed"], (p, v.get("failure"))
        assert "not checked" in v["verdict"]  # no kernel-level check on this backend, and the record says so
        # the demo's 4 cross-attentions on its one class token run as v broadcast (graph_opt.fuse_attention),
        # and its 4 feed-forwards' GEGLU projections as two matmuls each (ptqd.engines.geglu); the engine still
        # validates
        assert r["graph_rewrites"]["single_key_attention"] == 4 and r["graph_rewrites"]["removed_nodes"] > 0, r
        assert r["graph_rewrites"]["one_token_nodes"] >= 4 * 4, r  # to_out's Q/DQ, matmul, bias on the one token
        assert r["graph_rewrites"]["proj_in_on_tokens"] == 4, r  # each transformer's proj_in: a matmul on tokens
        assert r["graph_rewrites"]["split_geglu"] == 4 and r["graph_rewrites"]["weight_zero_points_dropped"] > 50, r
        # --act-grid auto (the default): on a CPU with AMX-INT8 the inputs with negative values read as int8 on
        # symmetric grids, elsewhere as u8 with their calibrated zero points
        grids = r["activation_grids"]
        if has_amx_int8():
            assert r["act_grid"] == "signed" and grids["int8 symmetric"] > 10 and "u8 zero point" not in grids, grids
            assert p != "w4a4" or (grids["4-bit int8"] > 10 and "4-bit u8" not in grids), grids
        else:
            # (a calibrated zero point of exactly 128 still counts as symmetric: only u8 with zero points is asserted)
            assert r["act_grid"] == "unsigned" and grids.get("u8 zero point", 0) > 10, grids
            assert p != "w4a4" or (grids["4-bit u8"] > 10 and "4-bit int8" not in grids), grids
        # each transformer's proj_out reads its input Q/DQ above the Transpose back to NCHW (write_qdq's inputs_at)
        assert r["inputs_moved_to_source"] == 4, r["inputs_moved_to_source"]
    b = Bundle.open(out)
    for p in recs:
        xml, bin_ = layout.ov_engine(p)
        assert b.path(xml).is_file() and b.path(bin_).is_file()  # both listed and matching their sha256
    sizes = {p: (out / layout.ov_engine(p)[1]).stat().st_size for p in recs}
    assert sizes["w4a8"] < 0.65 * sizes["w8a8"] and sizes["w4a4"] < 0.65 * sizes["w8a8"]
    assert recs["w4a8"]["i4_constants"] > 0 and recs["w8a8"]["i4_constants"] == 0  # ±63 weights never fit
    assert b.stage("build_openvino")["precisions"] == ["w4a4", "w4a8", "w8a8"]


def test_openvino_engines_compute_what_the_onnxruntime_engines_compute(ov_bundle, tmp_path):
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.facts import seeded_unet_inputs

    unsigned = tmp_path / "unsigned.bundle"
    shutil.copytree(ov_bundle[0], unsigned)
    api.build(unsigned, backend="openvino", precisions=("w8a8",), progress=False, act_grid="unsigned")
    signed = tmp_path / "signed.bundle"  # by name, whatever --act-grid auto picks on this CPU
    shutil.copytree(ov_bundle[0], signed)
    api.build(signed, backend="openvino", precisions=("w8a8", "w4a8"), progress=False, act_grid="signed")
    b = Bundle.open(ov_bundle[0])
    f = seeded_unet_inputs(b.facts, 4, 501.0, 0)
    args = (f["x"], f["t"], f.get("context"))
    fp = api.open_engine(b, "fp32")(*args)
    rel = lambda a, r: float(np.linalg.norm(a - r) / np.linalg.norm(r))  # noqa: E731
    # on the calibration's own grids (--act-grid unsigned): closer to ORT's engine than that is to FP32 (not
    # bit-exact: OpenVINO's layout leaves the conv outputs in float, where ONNX Runtime's requantizes them)
    ort_eps = api.open_engine(b, "w8a8")(*args)
    ov_eps = api.open_engine(Bundle.open(unsigned), "w8a8", backend="openvino")(*args)
    assert rel(ov_eps, ort_eps) < 0.8 * rel(ort_eps, fp)
    # signed grids widen some inputs' steps: still the same calibration, about as close to FP32
    for p in ("w8a8", "w4a8"):
        ort_eps = api.open_engine(b, p)(*args)
        ov_eps = api.open_engine(Bundle.open(signed), p, backend="openvino")(*args)
        assert rel(ov_eps, ort_eps) < 2 * rel(ort_eps, fp), p
        assert rel(ov_eps, fp) < 1.5 * rel(ort_eps, fp), p


def test_sampling_through_openvino_matches_onnxruntime(ov_bundle):
    from ptqd import api

    # 64 images: with 8, one or two images that land on another digit move the PSNR by 2-3 dB either way
    kw = dict(num=64, seed=3, steps=8, precision="w8a8", correction="off")
    ort_img = api.sample(ov_bundle[0], **kw)[0].astype(np.float64)
    ov_img = api.sample(ov_bundle[0], backend="openvino", **kw)[0].astype(np.float64)
    fp_img = api.sample(ov_bundle[0], **{**kw, "precision": "fp32"})[0].astype(np.float64)
    psnr = lambda a, r: 10 * np.log10(255.0 ** 2 / np.mean((a - r) ** 2))  # noqa: E731
    assert psnr(ov_img, ort_img) > 30
    assert psnr(ov_img, fp_img) > psnr(ort_img, fp_img) - 3


def test_cli_eval_and_sample_on_openvino(ov_bundle, tmp_path, capsys):
    from ptqd.cli import main

    assert main(["eval", str(ov_bundle[0]), "--precisions", "fp32,w4a8", "--num", "16", "--steps", "6",
                 "--backend", "openvino", "--correction", "off"]) == 0
    assert "w4a8" in capsys.readouterr().out
    png = tmp_path / "s.png"
    assert main(["sample", str(ov_bundle[0]), "--plan", "auto", "--num", "4", "--steps", "6",
                 "--backend", "openvino", "--out", str(png)]) == 0
    assert png.stat().st_size > 0


def test_the_demo_reports_openvino_throughput_from_the_built_engines(ov_bundle, monkeypatch):
    import ptqd.stages.build
    from ptqd.errors import ValidationError
    from ptqd.tools.demo import openvino_throughput

    def no_rebuild(*a, **k):
        raise ValidationError("openvino engine vs fake-quant model", "rebuilt although the engines were current")

    monkeypatch.setattr(ptqd.stages.build, "build", no_rebuild)
    res = openvino_throughput(ov_bundle[0], steps=20, cfg_x=2)
    assert set(res) == {"w8a8@openvino", "w4a8@openvino", "w4a4@openvino"}, res  # reused, not rebuilt
    assert all(v["images_per_s"] > 0 and v["vs_ort_fp32"] > 0 for v in res.values())


def test_the_demo_survives_an_openvino_engine_that_fails(compiled, tmp_path, monkeypatch):
    import shutil

    import ptqd.stages.build
    from ptqd.errors import ValidationError
    from ptqd.tools.demo import openvino_throughput

    out = tmp_path / "d.bundle"
    shutil.copytree(compiled[0], out)

    def failing(*a, **k):
        raise ValidationError("openvino engine vs fake-quant model", "w8a8: differs")

    monkeypatch.setattr(ptqd.stages.build, "build", failing)
    res = openvino_throughput(out, steps=20, cfg_x=2)  # a note for the demo's table, not an exception
    assert set(res) == {"error"} and "w8a8: differs" in res["error"], res


def test_missing_engine_and_damaged_weights_are_clear_errors(compiled, ov_bundle, tmp_path):
    from ptqd import api
    from ptqd.bundle import Bundle, layout
    from ptqd.errors import BundleError, UserError

    with pytest.raises(UserError, match="--backend openvino"):
        api.open_engine(Bundle.open(compiled[0]), "w8a8", backend="openvino")
    with pytest.raises(UserError, match="choose from w8a8, w4a8, w4a4"):
        api.build(compiled[0], backend="openvino", precisions=("ort-int8",))
    out = tmp_path / "damaged.bundle"
    shutil.copytree(ov_bundle[0], out)
    binp = out / layout.ov_engine("w8a8")[1]
    data = bytearray(binp.read_bytes())
    data[len(data) // 2] ^= 0xFF
    binp.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="w8a8.bin"):
        api.open_engine(Bundle.open(out), "w8a8", backend="openvino")


def test_without_openvino_the_backend_says_how_to_install_it(monkeypatch):
    from ptqd.engines.openvino import require_openvino
    from ptqd.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ptqd\[openvino\]'"):
        require_openvino()


def test_executed_graph_summary_names_int8_and_float_layers(ov_bundle):
    """The plugin's executed graph: ptqd's w8a8 runs its convs and matmuls in int8, FP32 runs them in float."""
    from ptqd.bundle import Bundle
    from ptqd.facts import seeded_unet_inputs
    from ptqd.runtime.loader import open_engine

    b = Bundle.open(ov_bundle[0])
    feeds = seeded_unet_inputs(b.facts, 1, 500.0, 0)
    q = open_engine(b, "w8a8", backend="openvino")
    q = q.pick(500.0) if hasattr(q, "pick") else q
    s = q.executed_summary({n: feeds[n] for n in q.input_names}, runs=2)
    fp = open_engine(b, "fp32", backend="openvino").executed_summary(feeds, runs=2)
    assert s["compute_layers"].get("int8", 0) > 0 and fp["compute_layers"].get("int8", 0) == 0
    assert sum(fp["compute_layers"].values()) > 0 and s["layer_ms"] > 0
    assert abs(sum(s["time_share"].values()) - 1) < 1e-6 and "int8 compute" in s["time_share"]


def test_backend_auto_times_both_and_the_runtime_follows_the_choice(ov_bundle, tmp_path):
    import json

    import ptqd
    from ptqd import api
    from ptqd.bundle import Bundle, layout
    from ptqd.runtime.loader import resolve_backend
    from ptqd.stages.choose import choose_backend

    out = tmp_path / "auto.bundle"
    shutil.copytree(ov_bundle[0], out)
    assert resolve_backend(Bundle.open(out), "auto") == "onnxruntime"  # nothing timed yet
    lines = []
    rec = choose_backend(out, runs=3, log=lines.append)
    assert rec["backend"] in ("onnxruntime", "openvino") and set(rec["score_ms"]) == {"onnxruntime", "openvino"}
    assert rec["precisions"] == ["w8a8", "w4a8", "w4a4"] and rec["batches"] == [1, 2] and "CPU" in rec["cpu"]
    assert rec["score_ms"][rec["backend"]] == min(rec["score_ms"].values())
    assert lines and lines[0].startswith(f"backend auto: {rec['backend']}")
    b = Bundle.open(out)
    assert resolve_backend(b, None) == rec["backend"] and resolve_backend(b, "onnxruntime") == "onnxruntime"
    # the choice is what sampling runs by default; one timed on another CPU is used, with a note
    forced = dict(rec, backend="openvino", cpu="another CPU")
    with Bundle.transaction(out) as w:
        w.write_json(layout.BACKEND_CHOICE, forced)
    notes = []
    assert resolve_backend(Bundle.open(out), "auto", log=notes.append) == "openvino"
    assert "timed on another CPU" in notes[0]
    assert ptqd.Pipeline.from_bundle(out, precision="w8a8").backend == "openvino"
    a, _ = api.sample(out, num=2, steps=3, precision="w8a8")
    o, _ = api.sample(out, num=2, steps=3, precision="w8a8", backend="openvino")
    np.testing.assert_array_equal(a, o)
    assert json.loads((out / layout.BACKEND_CHOICE).read_text())["backend"] == "openvino"
    # a plan or precision the faster backend has no engine for runs on ONNX Runtime, with a note
    with Bundle.transaction(out) as w:
        w.write_json(layout.BACKEND_CHOICE, dict(rec, backend="openvino"))
    notes = []
    b = Bundle.open(out)
    assert resolve_backend(b, "auto", log=notes.append, needs=["w8a8", "ort-int8"]) == "onnxruntime"
    assert "no ort-int8 engine" in notes[0]


def test_openvino_engines_leave_conv_outputs_in_float_and_validate_as_such(ov_bundle):
    """OpenVINO's layout: no requantization after a quantized conv (ONNX Runtime's QLinearConv needs it, OpenVINO's
    plugin does not, and it costs ~9 % there); every input quantizer stays. The build validated each engine
    against the fake-quant model of exactly that layout (the fixture's build would have failed otherwise)."""
    from ptqd.bundle import Bundle, layout
    from ptqd.engines.openvino import read_engine, shared_core
    from ptqd.stages.common import calib_layers

    def producer(node) -> str:
        return node.input(0).get_source_output().get_node().get_type_name()

    out, recs = ov_bundle
    b = Bundle.open(out)
    for p in ("w8a8", "w4a4"):
        assert "not requantized" in recs[p]["numerics"] and recs[p]["conv_outputs"] == "float"
        model = read_engine(shared_core(), b.path(layout.ov_engine(p)[0]))
        after_conv = inputs = 0
        for op in model.get_ordered_ops():
            if op.get_type_name() != "FakeQuantize":
                continue
            src = op.input(0).get_source_output().get_node()
            if src.get_type_name() == "Constant":
                continue  # a weight's
            inputs += 1
            feeds = [src] + [i.get_source_output().get_node() for i in src.inputs()]  # a conv, or its bias Add
            after_conv += any(n.get_type_name() == "Convolution" and producer(n) == "FakeQuantize" for n in feeds)
        assert after_conv == 0, p
        n_layers = len(calib_layers(b, p))
        assert 0.5 * n_layers < inputs <= n_layers, (p, inputs, n_layers)  # shared Q per tensor: at most one each
