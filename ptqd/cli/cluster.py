"""The CLI's Ray options (``--ray``, ``--workers``, ``--threads``, ``--shard-size``) and ``ptqd serve``."""

from __future__ import annotations

from ptqd.errors import UserError


def cmd_serve(args) -> int:
    from ptqd.cluster import import_ray
    from ptqd.validate import integer

    integer("--port", args.port, 1, 65535)
    integer("--replicas", args.replicas, 1, 1024)
    integer("--threads", args.threads, 1, 1024)
    integer("--max-batch", args.max_batch, 1, 4096)
    integer("--max-num", args.max_num, 1, args.max_batch)
    if not 0 <= args.batch_wait_ms <= 10_000:
        raise UserError(f"--batch-wait-ms must be from 0 to 10000, got {args.batch_wait_ms}")
    precisions = [p for p in args.precisions.split(",") if p]
    if not precisions:
        raise UserError("--precisions: give at least one, e.g. auto or fp32,w8a8")
    import_ray()
    from ptqd.cluster.serve import run_server

    run_server(args.bundle, host=args.host, port=args.port, precisions=precisions, backend=args.backend,
               replicas=args.replicas, threads=args.threads, max_batch=args.max_batch, wait_ms=args.batch_wait_ms,
               max_num=args.max_num, ray_address=args.ray, log=lambda m: print(m, flush=True))
    return 0


def cluster_options(args):
    """--ray/--workers/--threads/--shard-size as a Cluster (None: this process)."""
    from ptqd.cluster import Cluster

    if args.shard_size is not None and args.ray is None:
        raise UserError("--shard-size splits a run over Ray workers: add --ray local (or --ray ADDRESS)")
    if args.shard_size is not None:
        from ptqd.validate import integer

        integer("--shard-size", args.shard_size, 1)
    return Cluster.from_options(args.ray, args.workers, args.threads, args.gpus_per_worker)
