"""Sharded sampling and eval on a local Ray instance: bit-identical to one process whatever the workers and shard
size, a killed worker's shards run again with the same result, a worker that cannot start is named."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ptqd import api  # noqa: E402
from ptqd.cluster import Cluster, run_shards  # noqa: E402
from ptqd.errors import UserError  # noqa: E402
from ptqd.runtime.generate import SampleWorker  # noqa: E402

NUM, BATCH = 24, 4


@pytest.fixture(scope="module")
def local_ray():
    """One local instance for the module (3 logical CPUs so that 3 one-thread workers fit; loopback only)."""
    ray.init(num_cpus=3, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(compiled):
    """Single-process samples of the demo's step-aware plan (PTQD's correction, VSC at eta 1)."""
    bundle = compiled[0]
    return {eta: api.sample(bundle, num=NUM, seed=7, steps=10, eta=eta, precision="auto", batch=BATCH,
                            progress=False) for eta in (0.0, 1.0)}


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("workers,shard", [(2, 4), (2, 8), (3, 4), (3, 8)])
def test_sharded_sample_is_bit_identical(compiled, local_ray, reference, eta, workers, shard):
    images, labels = api.sample(compiled[0], num=NUM, seed=7, steps=10, eta=eta, precision="auto", batch=BATCH,
                                progress=False, cluster=Cluster("local", workers, 1), shard_size=shard)
    want, want_labels = reference[eta]
    assert images.dtype == np.uint8 and images.shape == want.shape
    assert np.array_equal(images, want)
    assert np.array_equal(labels, want_labels)


def test_sharded_sample_differs_with_another_seed(compiled, local_ray, reference):
    """The comparison above can fail: another seed gives other images."""
    images, _ = api.sample(compiled[0], num=NUM, seed=8, steps=10, precision="auto", batch=BATCH, progress=False,
                           cluster=Cluster("local", 2, 1))
    assert not np.array_equal(images, reference[0.0][0])


def test_sharded_eval_equals_single_process(compiled, local_ray):
    kw = dict(precisions=("fp32", "w8a8", "auto"), num=32, seed=3, steps=10, batch=8, progress=False,
              write_report=False)
    one = api.evaluate(compiled[0], **kw)
    two = api.evaluate(compiled[0], cluster=Cluster("local", 2, 1), shard_size=16, **kw)
    assert [r["precision"] for r in two["rows"]] == [r["precision"] for r in one["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        for key in ("fd", "fd_vs_fp", "psnr_vs_fp", "class_acc"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-9, abs=0), (a["precision"], key)
        assert {k: v for k, v in a.items() if k != "seconds"}.keys() == {k for k in b if k != "seconds"}
    assert one["rows"][1]["fd_vs_fp"] > 0 and one["rows"][1]["psnr_vs_fp"] < 100


def _sample_init(bundle, **settings):
    from ptqd.bundle import Bundle, layout

    b = Bundle.open(bundle)
    labels = api.default_labels(b.facts, None, NUM)
    s = dict(seed=7, steps=10, eta=1.0, guidance=3.0, sampler="auto", batch=2) | settings
    return (str(b.root.resolve()), b.digest(), "w8a8", "onnxruntime", "auto", 1, layout.class_embedding(b), labels, s)


def test_killed_worker_shards_run_again(compiled, local_ray):
    """kill -9 of a worker after the first result: Ray restarts it, its shards run again, every shard is kept
    once and the images equal the single-process run's."""
    want = api.sample(compiled[0], num=NUM, seed=7, steps=10, eta=1.0, precision="w8a8", batch=2, progress=False,
                      backend="onnxruntime")[0]
    killed = []

    def kill_first_worker(pool, done):
        if done == 1:
            killed.append(pool.pids[0])
            os.kill(pool.pids[0], signal.SIGKILL)

    shards = [(s, s + 2, None) for s in range(0, NUM, 2)]
    parts = run_shards(Cluster("local", 2, 1), SampleWorker, _sample_init(compiled[0]), shards, NUM, "sample",
                       progress=False, on_result=kill_first_worker)
    assert killed, "the fault was not injected"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)  # that process is gone
    assert len(parts) == len(shards) and all(len(p) == 2 for p in parts)
    assert np.array_equal(np.concatenate(parts), want)


def test_worker_that_cannot_open_the_bundle_is_named(compiled, local_ray, tmp_path):
    init = list(_sample_init(compiled[0]))
    init[0] = str(tmp_path / "not-on-this-node.bundle")  # what a worker sees where the driver's path is not shared
    with pytest.raises(UserError, match=r"Ray worker \d on node .*pid \d+.* cannot run this: BundleError: bundle "
                                        r"not found"):
        run_shards(Cluster("local", 2, 1), SampleWorker, tuple(init), [(0, 2, None)], 2, "sample", progress=False)


def test_worker_without_the_backend_is_named(compiled, local_ray, tmp_path):
    """A worker whose Python lacks OpenVINO (here: an import that fails on the workers only)."""
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    init = list(_sample_init(compiled[0]))
    init[2], init[3] = "fp32", "openvino"
    with pytest.raises(UserError, match=r"on node .* cannot run this: MissingDependencyError: the openvino backend "
                                        r"needs OpenVINO"):
        run_shards(Cluster("local", 1, 1), SampleWorker, tuple(init), [(0, 2, None)], 2, "sample", progress=False,
                   runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path / "site")}})


def test_bundle_changed_under_a_sharded_run_is_refused(compiled, local_ray):
    init = list(_sample_init(compiled[0]))
    init[1] = "0" * 64  # the digest the driver saw: a writer has committed since
    with pytest.raises(UserError, match="was updated by another ptqd process.*run the command again"):
        run_shards(Cluster("local", 1, 1), SampleWorker, tuple(init), [(0, 2, None)], 2, "sample", progress=False)


def test_cluster_options_are_checked():
    with pytest.raises(UserError, match="add --ray local"):
        Cluster.from_options(None, workers=2)
    with pytest.raises(UserError, match="--workers"):
        Cluster.from_options("local", workers=0)
    assert Cluster.from_options(None) is None
    assert Cluster.from_options("local", 3, 1) == Cluster("local", 3, 1)


def _one_process_and_sharded(bundle, tmp_path, stage, kw: dict, sharded: dict):
    """``stage`` on two copies of ``bundle``: in this process, and with its trajectories on 2 workers; torch on one
    thread on both sides (its CPU kernels may reduce in another order with another thread count)."""
    import shutil

    import torch

    one, two = tmp_path / "one.bundle", tmp_path / "two.bundle"
    shutil.copytree(bundle, one)
    shutil.copytree(bundle, two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return stage(one, **kw), stage(two, cluster=Cluster("local", 2, 1), **sharded, **kw)
    finally:
        torch.set_num_threads(threads)


def test_sharded_correct_fits_the_same_correction(compiled, local_ray, tmp_path):
    """The FP trajectories of `correct` on 2 workers: the same fit as one process. torch's CPU kernels may reduce
    in another order with another thread count, so both sides run torch on one thread."""
    kw = dict(samples=16, holdout=4, batch=4, progress=False, gate=False)
    a, b = _one_process_and_sharded(compiled[0], tmp_path, api.correct, kw, dict(shard_size=4))
    assert b["sharded"] and a["sharded"] is None
    assert a["precisions"] == b["precisions"]
    assert a["summary"] == b["summary"]


def test_workers_asking_for_more_than_the_cluster_has_are_refused(local_ray):
    with pytest.raises(UserError, match=r"need 2 GPUs; the Ray cluster at local has 0"):
        run_shards(Cluster("local", 2, 1, gpus=1.0), SampleWorker, (), [(0, 1, None)], 1, "sample", progress=False)
    with pytest.raises(UserError, match=r"need 8 CPUs"):
        run_shards(Cluster("local", 4, 2), SampleWorker, (), [(0, 1, None)], 1, "sample", progress=False)


def test_sharded_calibration_records_the_same_statistics(compiled, local_ray, tmp_path):
    """Calibration's pass 1 on 2 workers, one trajectory chunk per shard: the same quantization parameters and
    calibration inputs, file for file (torch on one thread on both sides, as for correct)."""
    from ptqd.bundle import Bundle

    one, two = tmp_path / "one.bundle", tmp_path / "two.bundle"
    a, b = _one_process_and_sharded(compiled[0], tmp_path, api.calibrate,
                                    dict(samples=8, steps=6, preset="minimal", progress=False), {})
    files = {}
    for root in (one, two):
        m = Bundle.open(root).files
        files[root] = {k: v["sha256"] for k, v in m.items() if k.startswith("calib/") and not k.endswith(".json")}
    assert files[one] and files[one] == files[two]
    assert a["per_step_input_range"] == b["per_step_input_range"]
    assert a["calibration_inputs"] == b["calibration_inputs"]


def test_cli_sample_and_eval_with_ray(compiled, local_ray, tmp_path, capsys):
    import json

    from ptqd.cli import main

    bundle = str(compiled[0])
    base = ["sample", bundle, "--num", "8", "--batch", "4", "--steps", "6", "--plan", "w8a8"]
    assert main(base + ["--out", str(tmp_path / "one.npz")]) == 0
    assert main(base + ["--out", str(tmp_path / "ray.npz"), "--ray", "local", "--workers", "2", "--threads", "1",
                        "--shard-size", "4"]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "ray.npz")
    assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["labels"], two["labels"])
    capsys.readouterr()
    ev = ["eval", bundle, "--num", "8", "--batch", "4", "--steps", "6", "--precisions", "fp32,w8a8", "--json"]
    assert main(ev) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert main(ev + ["--ray", "local", "--workers", "2"]) == 0
    rows_ray = json.loads(capsys.readouterr().out)["rows"]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows_ray]
    assert main(["sample", bundle, "--num", "8", "--batch", "4", "--ray", "local", "--shard-size", "6"]) == 1
    assert "must be a multiple of --batch 4" in capsys.readouterr().err
