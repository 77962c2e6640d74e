"""Engines over 1 GiB of weights (SDXL's int8 weights are 2.6 GB; one protobuf cannot pass 2 GB): the QDQ graph and
the engine keep their initializers in a ``.data`` file beside them, declared in the bundle, and the QDQ writer never
reads the float weights it replaces. Forced here on the demo model by lowering the threshold."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ptqd import api
from ptqd.bundle import Bundle


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    d = tmp_path_factory.mktemp("x") / "demo.bundle"
    api.export("demo", d, progress=False)
    api.calibrate(d, samples=4, steps=4, progress=False)
    return d


def test_engines_over_the_threshold_keep_their_weights_beside_them(calibrated, monkeypatch):
    from ptqd.engines import onnx_io

    fp, _ = api.sample(calibrated, num=2, steps=4, progress=False)
    monkeypatch.setattr(onnx_io, "EXTERNAL_DATA_THRESHOLD", 0)
    recs = api.build(calibrated, precisions=("w8a8", "w4a8"), progress=False)
    monkeypatch.undo()
    b = Bundle.open(calibrated)
    files = json.loads((calibrated / "manifest.json").read_text())["files"]
    for p in ("w8a8", "w4a8"):
        assert recs[p]["validation_vs_fake_quant"]["passed"]
        for rel in (f"engines/onnxruntime/{p}.qdq.onnx", f"engines/onnxruntime/{p}.onnx"):
            g = onnx.load(str(b.path(rel)), load_external_data=False).graph
            assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)
            assert f"{rel}.data" in files and b.path(f"{rel}.data").stat().st_size > 0  # declared, checksummed
        assert recs[p]["size_bytes"] > b.path(f"engines/onnxruntime/{p}.onnx").stat().st_size
        q, _ = api.sample(calibrated, num=2, steps=4, precision=p, progress=False)
        assert q.shape == fp.shape and np.abs(q.astype(int) - fp.astype(int)).mean() < 30
    assert recs["w4a8"]["packed_int4_weights"] > 0
    # built again under the normal threshold: one file each, and no stale .data left declared
    api.build(calibrated, precisions=("w8a8",), progress=False)
    files = json.loads((calibrated / "manifest.json").read_text())["files"]
    assert not any(f.startswith("engines/onnxruntime/w8a8") and f.endswith(".data") for f in files)
    assert not (calibrated / "engines/onnxruntime/w8a8.onnx.data").exists()


def test_the_qdq_writer_does_not_read_the_float_weights_it_replaces(calibrated, tmp_path, monkeypatch):
    from ptqd.calib.calibrate import load_params
    from ptqd.engines import onnx_io
    from ptqd.engines.qdq import write_qdq

    b = Bundle.open(calibrated)
    ext = tmp_path / "fp" / "unet.onnx"
    ext.parent.mkdir()
    onnx.save_model(onnx.load(str(b.path("unet.onnx"))), str(ext), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="unet.onnx.data", size_threshold=0)
    layers = load_params(b.read_json("calib/w8a8.json"), np.load(b.path("calib/w8a8.npz")))
    read = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def seek(self, n):
            return self.f.seek(n)

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def close(self):
            self.f.close()

    monkeypatch.setattr(onnx_io, "open", lambda p, mode="r": Spy(real_open(p, mode)), raising=False)
    write_qdq(ext, layers, tmp_path / "a.qdq.onnx")
    monkeypatch.undo()
    write_qdq(b.path("unet.onnx"), layers, tmp_path / "b.qdq.onnx")
    total = ext.with_name("unet.onnx.data").stat().st_size
    g = onnx.load(str(ext), load_external_data=False).graph
    nodes = {n.name: n for n in g.node}
    replaced = {nodes[lq.name].input[1] for lq in layers if lq.op != "Gemm"}
    skipped = sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in g.initializer
                  if t.name in replaced)
    assert skipped > 0.5 * total and sum(read) == total - skipped
    a, c = onnx.load(str(tmp_path / "a.qdq.onnx")).graph, onnx.load(str(tmp_path / "b.qdq.onnx")).graph
    assert list(a.node) == list(c.node)  # the same QDQ graph as from the inline model, the same constants
    values = {t.name: numpy_helper.to_array(t) for t in c.initializer}
    assert sorted(values) == sorted(t.name for t in a.initializer)
    assert all(np.array_equal(numpy_helper.to_array(t), values[t.name]) for t in a.initializer)
