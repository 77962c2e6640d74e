"""``ptqd serve`` with a text-to-image bundle (the tiny Stable Diffusion pipeline): prompts batched across
requests give each request the image ``ptqd sample --prompt`` gives."""

from __future__ import annotations

import io
import json
import socket
import threading

import numpy as np
import pytest

pytest.importorskip("ray.serve")

from ptqd import api  # noqa: E402
from ptqd.cluster.load import post  # noqa: E402


@pytest.fixture(scope="module")
def text_server(tmp_path_factory):
    import ray
    from ray import serve

    from ptqd.cluster.serve import run_server
    from ptqd.models.tiny_sd import write_tiny_sd_pipeline

    pipe = write_tiny_sd_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")
    bundle = tmp_path_factory.mktemp("sdb") / "sd.bundle"
    api.export(pipe, bundle, progress=False, prompts=["a red cat", "the dog"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_server(bundle, port=port, precisions=["fp32"], backend="onnxruntime", replicas=1, threads=1, max_batch=4,
               wait_ms=300, max_num=2, block=False, log=lambda m: None)
    yield f"http://127.0.0.1:{port}/generate", bundle
    serve.shutdown()
    ray.shutdown()


def _png(data):
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)))


def test_concurrent_prompts_share_a_batch_and_match_ptqd_sample(text_server):
    url, bundle = text_server
    bodies = {"a red cat": {"prompt": "a red cat", "seed": 3, "steps": 4, "guidance": 5.0},
              "the dog": {"prompt": "the dog", "seed": 4, "steps": 4, "guidance": 5.0, "negative_prompt": ""}}
    answers = {}

    def ask(name):
        answers[name] = post(url, json.dumps(bodies[name]).encode())

    threads = [threading.Thread(target=ask, args=(n,)) for n in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, body in bodies.items():
        status, headers, data = answers[name]
        assert status == 200, data
        want = api.sample(bundle, prompts=[name], num=1, seed=body["seed"], steps=4, guidance=5.0,
                          progress=False, backend="onnxruntime")[0][0]
        assert np.array_equal(_png(data), want)
    assert max(int(a[1]["x-unet-batch"]) for a in answers.values()) == 2  # both prompts in one UNet batch


@pytest.mark.parametrize("body,field", [({"class": 1}, "prompt"), ({"prompt": 3}, "prompt"),
                                        ({"prompt": "x", "negative_prompt": ["a"]}, "negative_prompt"),
                                        ({"prompt": "x", "num": 3}, "num")])
def test_text_requests_are_checked(text_server, body, field):
    status, _, data = post(text_server[0], json.dumps(body).encode())
    assert status == 400 and field in json.loads(data)["error"]
