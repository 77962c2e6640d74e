"""A bounded load test of ``ptqd serve`` on loopback: concurrent clients, valid and invalid bodies mixed, then the
same load with one generator replica killed part-way (``ray.kill``).

    python benchmarks/serve_load.py BUNDLE [--clients 8 --requests 200 --replicas 2 --steps 20] [--json out.json]

Reports p50/p99 latency of the valid requests, their throughput, the mean UNet batch a valid request ran in
(samples batched across callers), failed valid requests (must be 0) and invalid requests not answered 4xx (must
be 0), and how many valid requests the ingress moved to another replica after the kill. A class-conditional
bundle (the demo) is what the bodies are written for.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=50.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from ptqd.bundle import Bundle
    from ptqd.cluster.load import kill_replica, mixed_bodies, run_load
    from ptqd.cluster.serve import run_server
    from ptqd.resources import cpu_description

    facts = Bundle.open(args.bundle).facts
    if facts.conditioning.kind != "class":
        raise SystemExit("serve_load.py writes class-conditional bodies: give a class-conditional bundle (the demo)")
    classes = [c for c in range(facts.conditioning.num_classes) if c != facts.conditioning.null_class]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    run_server(args.bundle, port=port, precisions=[args.precision], replicas=args.replicas, threads=args.threads,
               max_batch=args.max_batch, wait_ms=args.batch_wait_ms, max_num=min(4, args.max_batch), block=False,
               log=lambda m: print(m, file=sys.stderr))
    url = f"http://127.0.0.1:{port}"
    out = {"cpu": cpu_description(), "bundle": args.bundle, "startup_s": round(time.perf_counter() - t0, 1),
           "config": vars(args)}
    try:
        run_load(url, mixed_bodies(2 * args.clients, classes, args.steps, invalid_every=0, seed0=10**6),
                 clients=args.clients)  # warm-up: every replica has run a batch
        res = run_load(url, mixed_bodies(args.requests, classes, args.steps), clients=args.clients)
        out["steady"] = res.summary()
        killed = []

        def fault(done):
            if done == args.requests // 4 and not killed:
                killed.append(kill_replica("generator"))

        res = run_load(url, mixed_bodies(args.requests, classes, args.steps, seed0=10**5), clients=args.clients,
                       on_done=fault)
        out["replica_killed"] = dict(res.summary(), killed=killed[0] if killed else None,
                                     failures=res.failures[:5])
    finally:
        serve.shutdown()
        ray.shutdown()
    for name in ("steady", "replica_killed"):
        s = out[name]
        print(f"{name:15s} valid {s['valid']} ok {s['ok']} failed {s['failed_valid']} | invalid {s['invalid']} "
              f"not-4xx {s['wrong_invalid']} | p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms | {s['throughput_rps']} "
              f"req/s | mean UNet batch {s['mean_unet_batch']} | retried {s['retried']}", file=sys.stderr)
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if not out["steady"]["failed_valid"] and not out["replica_killed"]["failed_valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
