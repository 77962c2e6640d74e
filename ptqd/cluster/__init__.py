"""Work spread over Ray workers: shards of independent samples (or trajectories), one result per shard, merged by
the caller in index order, so a sharded run gives the same numbers as the single-process one whatever the number
of workers, the shard size or which worker ran what.

    cluster = Cluster.from_options("local", workers=2, threads=1)      # or "auto", "ray://head:10001", "host:6379"
    results = run_shards(cluster, SampleWorker, (bundle, ...), shards, total=n, desc="sample w8a8")

A *worker class* (defined where its work lives: ``runtime.generate``, ``tools.metrics``, ``stages.correct``) has
``__init__(*init)``, which opens what the shards need once (a bundle's engines), and ``run(shard) -> (result,
count)``. Each worker runs inside a Ray actor (``Host``) that reports where it runs and why it could not start;
an actor that dies (``ray.kill``, ``kill -9``, a lost node) is restarted and its shards run again, and since a
shard's result depends only on the shard, the output is the same and each shard is kept exactly once.

Ray is imported only here, and only when a run asks for it: ``import ptqd`` stays light.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ptqd.errors import MissingDependencyError, UserError
from ptqd.progress import progress_bar

MAX_RESTARTS = 3  # per worker: a shard survives this many deaths of the worker running it
IN_FLIGHT = 2  # shards queued per worker, so a worker never waits for the driver between shards


def import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--ray needs Ray: pip install 'ptqd[cluster]' (ray[serve])") from None
    return ray


@dataclass(frozen=True)
class Cluster:
    """Where shards run. ``address``: ``local`` (a Ray instance on this machine, started for the run and stopped
    after it, unless one is already running in this process), ``auto`` (the cluster this machine belongs to), or a
    Ray address (``ray://head:10001``, ``head:6379``). ``workers``: actors; ``threads``: CPU threads per actor
    (each actor asks Ray for that many CPUs); ``gpus``: GPUs per actor (TensorRT engines: 1)."""

    address: str
    workers: int = 2
    threads: int = 1
    gpus: float = 0.0

    @classmethod
    def from_options(cls, address: str | None, workers: int | None = None,
                     threads: int | None = None, gpus: float | None = None) -> "Cluster | None":
        if address is None:
            if workers is not None or threads is not None or gpus:
                raise UserError("--workers, --threads and --gpus-per-worker spread a run over Ray workers: add --ray "
                                "local (this machine) or --ray ADDRESS (a cluster)")
            return None
        if not isinstance(address, str) or not address.strip():
            raise UserError("--ray: give 'local', 'auto' or a Ray address such as ray://head:10001")
        from ptqd.validate import integer

        cpus = os.cpu_count() or 1
        threads = integer("--threads", 1 if threads is None else threads, 1, 1024)
        workers = integer("--workers", max(1, cpus // threads) if workers is None else workers, 1, 4096)
        gpus = 0.0 if gpus is None else gpus
        if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not 0 <= gpus <= 64:
            raise UserError(f"--gpus-per-worker must be from 0 to 64 (fractions share a GPU), got {gpus}")
        return cls(address.strip(), workers, threads, float(gpus))

    def describe(self) -> str:
        return f"{self.workers} Ray worker{'s' * (self.workers != 1)} x {self.threads} thread{'s' * (self.threads != 1)}" \
               f" ({self.address})"


def connect(cluster: Cluster) -> bool:
    """Start or join Ray for ``cluster``; True when this call started it (and so should stop it)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True)
    try:
        if cluster.address == "local":
            ray.init(num_cpus=cluster.workers * cluster.threads, include_dashboard=False, **kw)
        else:
            ray.init(address=cluster.address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"--ray {cluster.address}: cannot reach a Ray cluster there ({str(e).splitlines()[0][:200]}); "
                        "start one with `ray start --head` or use --ray local") from None
    return True


class Host:
    """The actor around a worker: builds it, says where it runs, and keeps a start-up failure as a message (so
    that the driver can name the worker's node and the cause instead of a dead actor's traceback)."""

    def __init__(self, worker_cls, init: tuple):
        import socket

        self.where = f"node {socket.gethostname()} ({_node_ip()}), pid {os.getpid()}"
        self.error = None
        try:
            self.worker = worker_cls(*init)
        except Exception as e:  # reported by ready(): the worker's own environment, not the driver's
            self.worker, self.error = None, f"{type(e).__name__}: {e}"

    def ready(self) -> tuple[str, int, str | None]:
        return self.where, os.getpid(), self.error

    def run(self, shard):
        return self.worker.run(shard)


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests of Host itself)
        return "?"


class ShardPool:
    """Workers started on a cluster; ``pids[i]`` is worker i's process (what a fault test kills)."""

    def __init__(self, cluster: Cluster, worker_cls, init: tuple, runtime_env: dict | None = None):
        ray = import_ray()
        have = ray.cluster_resources()
        for what, per, flag in (("CPU", cluster.threads, "--threads"), ("GPU", cluster.gpus, "--gpus-per-worker")):
            need = cluster.workers * per
            if need > have.get(what, 0):
                raise UserError(f"--workers {cluster.workers} x {flag} {per:g} need {need:g} {what}s; the Ray cluster "
                                f"at {cluster.address} has {have.get(what, 0):g}: ask for fewer")
        actor = ray.remote(Host).options(num_cpus=cluster.threads, num_gpus=cluster.gpus, max_restarts=MAX_RESTARTS,
                                         max_task_retries=MAX_RESTARTS, runtime_env=runtime_env)
        self.ray, self.cluster = ray, cluster
        self.actors = [actor.remote(worker_cls, init) for _ in range(cluster.workers)]
        self.pids = []
        try:
            states = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayError as e:
            self.close()
            raise UserError(f"a Ray worker could not start: {_first_line(e)}") from None
        for i, (where, pid, error) in enumerate(states):
            if error is not None:
                self.close()
                raise UserError(f"Ray worker {i} on {where} cannot run this: {error}")
            self.pids.append(pid)

    def map(self, shards: Sequence[Any], total: int, desc: str, progress: bool | None = None,
            on_result=None, consume=None) -> list[Any] | None:
        """Results of ``shards`` in shard order. Shards go to whichever worker is free; ``on_result(pool, k)`` is
        called after the k-th result arrives (k = 1, 2, ...). With ``consume(k, result)``, each result is handed
        over in shard order as soon as the shards before it are in, and not kept (a fold over a long run)."""
        ray = self.ray
        results: dict[int, Any] = {}
        handed = 0
        todo = list(range(len(shards)))[::-1]
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (shard, worker)
        load = [0] * len(self.actors)
        done = 0
        with progress_bar(total, f"{desc} on {self.cluster.describe()}", progress) as bar:
            while todo or pending:
                for w, a in enumerate(self.actors):
                    while todo and load[w] < IN_FLIGHT:
                        k = todo.pop()
                        pending[a.run.remote(shards[k])] = (k, w)
                        load[w] += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                k, w = pending.pop(ready[0])
                load[w] -= 1
                try:
                    result, count = ray.get(ready[0])
                except ray.exceptions.RayTaskError as e:  # the work itself failed: the worker's own error
                    cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else None
                    if isinstance(cause, UserError):
                        raise type(cause)(str(cause)) from None
                    raise UserError(f"shard {k} failed on Ray worker {w}: {_first_line(e)}") from None
                except ray.exceptions.RayError as e:  # the worker died more than MAX_RESTARTS times
                    raise UserError(f"Ray worker {w} died running shard {k} and {MAX_RESTARTS} restarts did not help: "
                                    f"{_first_line(e)}") from None
                results[k] = result
                while consume is not None and handed in results:
                    consume(handed, results.pop(handed))
                    handed += 1
                done += 1
                bar.update(count)
                if on_result is not None:
                    on_result(self, done)
        return None if consume is not None else [results[k] for k in range(len(shards))]

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def run_shards(cluster: Cluster, worker_cls, init: tuple, shards: Sequence[Any], total: int, desc: str,
               progress: bool | None = None, runtime_env: dict | None = None, on_result=None,
               consume=None) -> list[Any] | None:
    """Run ``worker_cls(*init).run(shard)`` for every shard on ``cluster``; results in shard order (or each handed
    to ``consume(k, result)`` in shard order; see :meth:`ShardPool.map`)."""
    started = connect(cluster)
    try:
        pool = ShardPool(cluster, worker_cls, init, runtime_env)
        try:
            return pool.map(shards, total, desc, progress, on_result, consume)
        finally:
            pool.close()
    finally:
        if started:
            import_ray().shutdown()


def index_shards(n: int, shard_size: int, batch: int) -> list[tuple[int, int]]:
    """[start, stop) ranges covering 0..n-1. A shard holds whole batches of the single-process run (``batch``
    samples each), so every sample is computed in the same engine batch as there: the engines' results do not
    depend on the batch size in theory, but a kernel may pick another code path for another batch shape."""
    if shard_size % batch:
        raise UserError(f"--shard-size {shard_size} must be a multiple of --batch {batch}, so that each sample is "
                        "computed in the same batch as in a single-process run (bit-identical results)")
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
