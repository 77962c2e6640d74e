"""``ptqd serve`` on a local Ray Serve instance (loopback): a served image equals ``ptqd sample``'s, bad requests get
a 4xx naming the field, concurrent requests share UNet batches, and a replica killed under load loses nothing."""

from __future__ import annotations

import io
import json
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from ptqd import api  # noqa: E402
from ptqd.cluster.load import INVALID_BODIES, kill_replica, mixed_bodies, post, run_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(compiled):
    import ray
    from ray import serve

    from ptqd.cluster.serve import run_server

    port = free_port()
    run_server(compiled[0], port=port, precisions=["auto", "fp32"], backend="onnxruntime", replicas=2, threads=1,
               max_batch=8, wait_ms=100, max_num=4, block=False, log=lambda m: None)
    yield f"http://127.0.0.1:{port}", compiled[0]
    serve.shutdown()
    ray.shutdown()


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)))


def test_served_image_equals_ptqd_sample(server):
    url, bundle = server
    status, headers, data = post(url + "/generate", json.dumps({"class": 3, "seed": 11, "steps": 8}).encode())
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-seed"] == "11"
    want = api.sample(bundle, classes=[3], num=1, seed=11, steps=8, precision="auto", progress=False,
                      backend="onnxruntime")[0][0]
    assert np.array_equal(_png(data), want[..., 0] if want.shape[-1] == 1 else want)
    status, _, data = post(url + "/generate", json.dumps({"class": 3, "seed": 11, "steps": 8, "num": 2,
                                                          "precision": "fp32"}).encode())
    assert status == 200
    body = json.loads(data)
    fp = api.sample(bundle, classes=[3], num=2, seed=11, steps=8, progress=False, backend="onnxruntime")[0]
    import base64

    got = np.stack([_png(base64.b64decode(s)) for s in body["images"]])
    assert body["seed"] == 11 and np.array_equal(got, fp[..., 0] if fp.shape[-1] == 1 else fp)


@pytest.mark.parametrize("body", INVALID_BODIES, ids=range(len(INVALID_BODIES)))
def test_bad_requests_get_a_4xx_naming_the_problem(server, body):
    status, headers, data = post(server[0] + "/generate", body)
    assert 400 <= status < 500, (status, data)
    assert json.loads(data)["error"]


def test_routes_and_health(server):
    url = server[0]
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["precisions"] == ["auto", "fp32"] and health["replicas"] == 2
    for path, method, code in (("/nope", "GET", 404), ("/generate", "GET", 405), ("/health", "POST", 405)):
        req = urllib.request.Request(url + path, method=method, data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == code


def test_load_batches_requests_and_survives_a_killed_replica(server):
    """8 concurrent clients, a quarter of the bodies invalid; one generator replica is killed after the 12th
    answer: no valid request is lost (the ingress retries it on the other replica), every invalid one is a 4xx,
    and concurrent requests shared UNet batches."""
    killed = []

    def fault(done):
        if done == 12 and not killed:
            killed.append(kill_replica("generator"))

    res = run_load(server[0], mixed_bodies(64, classes=list(range(10)), steps=8), clients=8, on_done=fault)
    s = res.summary()
    assert killed, "the fault was not injected"
    assert not res.failures, res.failures[:3]
    assert s["valid"] == 48 and s["ok"] == 48 and s["invalid"] == 16
    assert s["mean_unet_batch"] > 1.0, s


@pytest.mark.parametrize("argv,match", [
    (["--max-num", "9", "--max-batch", "8"], "--max-num must be between 1 and 8"),
    (["--port", "0"], "--port must be between 1 and 65535"),
    (["--precisions", "w2a2"], "no onnxruntime engine for w2a2|w2a2"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be from 0"),
])
def test_serve_refuses_bad_options_before_starting(compiled, capsys, argv, match):
    import re

    from ptqd.cli import main

    assert main(["serve", str(compiled[0]), "--backend", "onnxruntime", *argv]) == 1
    assert re.search(match, capsys.readouterr().err)


def test_serve_refuses_a_missing_bundle(tmp_path, capsys):
    from ptqd.cli import main

    assert main(["serve", str(tmp_path / "nope.bundle")]) == 1
    assert "bundle not found" in capsys.readouterr().err
