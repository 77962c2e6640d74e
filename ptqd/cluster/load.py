"""A bounded load test of a ``ptqd serve`` endpoint (stdlib only): ``clients`` threads send ``requests`` bodies,
valid and invalid mixed, and the run reports latency percentiles, throughput, the UNet batch each valid request
rode in, and every answer that was not what it should be (a valid request not answered 200, an invalid one not
answered 4xx). ``benchmarks/serve_load.py`` and the tests drive it."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

# Bodies a server must refuse with a 4xx, whatever the bundle (bytes are sent as they are).
INVALID_BODIES = [
    b"{not json",
    b"[1, 2]",
    json.dumps({"class": 1, "steps": 0}).encode(),
    json.dumps({"class": 1, "steps": 100000}).encode(),
    b'{"class": 1, "guidance": NaN}',
    json.dumps({"class": 1, "guidance": "high"}).encode(),
    json.dumps({"class": 100000}).encode(),
    json.dumps({"class": 1, "num": 10000}).encode(),
    json.dumps({"class": 1, "precision": "w1a1"}).encode(),
    json.dumps({"class": 1, "seed": -1}).encode(),
    json.dumps({"class": 1, "bogus": True}).encode(),
    json.dumps({"class": 1, "prompt": "x" * 70000}).encode(),  # oversized
]


@dataclass
class LoadResult:
    valid: int = 0
    invalid: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, valid requests answered 200
    batches: list[int] = field(default_factory=list)  # the UNet batch (samples) each valid request ran in
    retries: int = 0  # valid requests the server moved to another replica
    failures: list[str] = field(default_factory=list)  # what should not have happened
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict:
        lat = sorted(self.latencies)

        def pct(q):
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else None

        return {"valid": self.valid, "invalid": self.invalid, "ok": len(lat), "failed_valid": len(
            [f for f in self.failures if f.startswith("valid")]), "wrong_invalid": len(
            [f for f in self.failures if f.startswith("invalid")]), "p50_ms": pct(0.5), "p99_ms": pct(0.99),
            "throughput_rps": round(len(lat) / self.seconds, 2) if self.seconds else None,
            "mean_unet_batch": round(sum(self.batches) / len(self.batches), 2) if self.batches else None,
            "retried": self.retries, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "seconds": round(self.seconds, 1)}


def post(url: str, body: bytes, timeout: float = 120.0) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def run_load(base_url: str, bodies: list[tuple[bool, bytes]], clients: int = 8, on_done=None) -> LoadResult:
    """Send ``bodies`` ((valid?, body) pairs, in order) from ``clients`` threads; ``on_done(k)`` after the k-th
    answer (a fault test kills a replica there)."""
    url = base_url.rstrip("/") + "/generate"
    res, lock, nxt = LoadResult(), threading.Lock(), [0]

    def client():
        while True:
            with lock:
                if nxt[0] >= len(bodies):
                    return
                valid, body = bodies[nxt[0]]
                nxt[0] += 1
            t0 = time.perf_counter()
            try:
                status, headers, data = post(url, body)
            except OSError as e:  # connection refused or reset: the server lost the request
                status, headers, data = 0, {}, str(e).encode()
            dt = time.perf_counter() - t0
            with lock:
                res.statuses[status] = res.statuses.get(status, 0) + 1
                if valid:
                    res.valid += 1
                    if status == 200:
                        res.latencies.append(dt)
                        res.batches.append(int(headers.get("X-Unet-Batch", headers.get("x-unet-batch", 0))))
                        res.retries += int(headers.get("X-Retries", headers.get("x-retries", 0))) > 0
                    else:
                        res.failures.append(f"valid request answered {status}: {data[:200]!r}")
                else:
                    res.invalid += 1
                    if not 400 <= status < 500:
                        res.failures.append(f"invalid request {body[:60]!r} answered {status}: {data[:200]!r}")
                done = res.valid + res.invalid
            if on_done is not None:
                on_done(done)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.seconds = time.perf_counter() - t0
    return res


def mixed_bodies(n: int, classes: list[int], steps: int, invalid_every: int = 4, seed0: int = 0) -> list[tuple[bool, bytes]]:
    """``n`` bodies for a class-conditional bundle: every ``invalid_every``-th one invalid, the rest valid
    (classes cycled, seeds seed0, seed0 + 1, ...)."""
    out = []
    for i in range(n):
        if invalid_every and i % invalid_every == invalid_every - 1:
            out.append((False, INVALID_BODIES[(i // invalid_every) % len(INVALID_BODIES)]))
        else:
            out.append((True, json.dumps({"class": classes[i % len(classes)], "seed": seed0 + i,
                                          "steps": steps}).encode()))
    return out


def kill_replica(deployment: str = "generator") -> str:
    """``ray.kill`` one replica of ``deployment`` of the running Serve app (a fault under load); its name."""
    import ray

    names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                   if deployment in a["name"] and "REPLICA" in a["name"].upper())
    if not names:
        raise RuntimeError(f"no replica of {deployment!r} is running")
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    return names[0]
