"""``ptqd serve``: a bundle behind an HTTP JSON endpoint on Ray Serve (this module needs Ray: ``ptqd[cluster]``).

Two deployments:

* ``Ingress`` (one replica, no CPU reserved): the routes. ``POST /generate`` checks the body
  (:mod:`ptqd.cluster.requests`: a 4xx naming the field, never a 500 on bad input), draws the seed where the request
  gave none, and forwards the checked request to a generator. When a generator replica dies under it (killed,
  out of memory, a lost node), the request goes to another replica: requests are pure functions of their fields,
  seed included, so the retry returns the image the lost replica would have. ``GET /health`` answers from the
  ingress and the generators' counters.
* ``Generator`` (``--replicas N``, ``--threads`` CPUs each): the bundle's :class:`~ptqd.runtime.pipe.Pipeline`
  per served precision, loaded once. Concurrent requests are batched (``serve.batch``, up to ``--max-batch``
  samples, waiting at most ``--batch-wait-ms``); requests with the same precision, steps, guidance and negative
  prompt share one UNet batch (CFG doubles it). Each request's sample i has noise from (its seed, i), as
  ``ptqd sample --seed`` does, so a served image equals the CLI's.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time

import numpy as np
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ptqd.cluster.requests import MAX_BODY, BadRequest, GenRequest, ServeSpec, parse_request

RETRIES = 3  # a request survives this many deaths of the replica running it
LOST = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


class Generator:
    def __init__(self, root: str, digest: str, precisions: list[str], backend: str, threads: int, max_batch: int,
                 wait_s: float):
        from ptqd.bundle import Bundle
        from ptqd.runtime.pipe import Pipeline

        b = Bundle.open(root)
        b.check_digest(digest)
        self.pipes = {p: Pipeline.from_bundle(b, p, backend=backend, threads=threads) for p in precisions}
        self.kind = b.facts.conditioning.kind
        self.generate.set_max_batch_size(max_batch)
        self.generate.set_batch_wait_timeout_s(wait_s)
        self.counters = {"requests": 0, "samples": 0, "unet_batches": 0}

    def stats(self) -> dict:
        return dict(self.counters)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=lambda reqs: sum(r.num for r in reqs))
    async def generate(self, reqs: list[GenRequest]) -> list[tuple[list[bytes], int]]:
        """Each request's PNGs and the size of the UNet batch (samples, before CFG doubles it) it ran in."""
        out: list = [None] * len(reqs)
        groups: dict[tuple, list[int]] = {}
        for k, r in enumerate(reqs):
            groups.setdefault(r.group(), []).append(k)
        for key, members in groups.items():
            images = await asyncio.to_thread(self._run_group, key, [reqs[k] for k in members])
            start = 0
            for k in members:
                out[k] = [png(im) for im in images[start:start + reqs[k].num]], len(images)
                start += reqs[k].num
        return out

    def _run_group(self, key: tuple, reqs: list[GenRequest]) -> np.ndarray:
        """One UNet batch for requests sharing ``key``: sample i of request r has noise (r.seed, i)."""
        precision, steps, guidance, negative = key
        pipe = self.pipes[precision]
        if self.kind == "text":
            prompts = list(dict.fromkeys(r.prompt for r in reqs))
            table = pipe.prompt_table(prompts, negative)
            rows = [1 + prompts.index(r.prompt) for r in reqs]
        else:
            table, rows = pipe.table, [r.label if r.label is not None else 0 for r in reqs]
        labels = np.concatenate([np.full(r.num, row, np.int64) for r, row in zip(reqs, rows)])
        seeds = np.concatenate([np.full(r.num, r.seed, np.int64) for r in reqs])
        indices = np.concatenate([np.arange(r.num) for r in reqs])
        images = pipe.generate(table, labels, seeds, steps, 0.0, guidance, "auto", None, batch=len(labels),
                               progress=False, indices=indices)
        self.counters["requests"] += len(reqs)
        self.counters["samples"] += len(labels)
        self.counters["unet_batches"] += 1
        return images


class Ingress:
    def __init__(self, generator, spec: ServeSpec, info: dict):
        self.generator, self.spec, self.info = generator, spec, info

    async def __call__(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/health":
                if method != "GET":
                    raise BadRequest(405, "GET /health")
                return JSONResponse(await self.health())
            if path == "/generate":
                if method != "POST":
                    raise BadRequest(405, "POST /generate with a JSON body")
                return await self.generate(request)
            raise BadRequest(404, f"no route {method} {path}: POST /generate, GET /health")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    async def health(self) -> dict:
        stats = {"requests": 0, "samples": 0, "unet_batches": 0}
        try:  # the counters of whichever replica answers: a sample of the load, not a total
            stats = await self.generator.stats.remote()
        except LOST:
            pass
        mean = stats["samples"] / stats["unet_batches"] if stats["unet_batches"] else None
        return dict(self.info, status="ok", replica_counters=stats, mean_unet_batch=mean)

    async def generate(self, request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise BadRequest(413, f"request body is {length} bytes; the limit is {MAX_BODY}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise BadRequest(413, f"request body is over {MAX_BODY} bytes")
        req = parse_request(body, self.spec)
        t0 = time.perf_counter()
        for attempt in range(RETRIES + 1):
            try:
                images, batch = await self.generator.generate.remote(req)
                break
            except RayTaskError as e:  # the request reached a replica and its work refused it
                from ptqd.errors import UserError

                if isinstance(getattr(e, "cause", None), UserError):
                    raise BadRequest(422, str(e.cause)) from None
                raise
            except LOST:
                if attempt == RETRIES:
                    return JSONResponse({"error": f"no generator replica could run the request after {RETRIES} "
                                                  "retries; try again"}, status_code=503)
                await asyncio.sleep(0.2 * (attempt + 1))
        headers = {"X-Seed": str(req.seed), "X-Seconds": f"{time.perf_counter() - t0:.3f}", "X-Unet-Batch": str(batch),
                   "X-Retries": str(attempt)}
        if req.fmt == "png":
            return Response(images[0], media_type="image/png", headers=headers)
        return JSONResponse({"seed": req.seed, "precision": req.precision, "steps": req.steps,
                             "images": [base64.b64encode(im).decode() for im in images]}, headers=headers)


def serve_spec(b, precisions: list[str], max_num: int) -> ServeSpec:
    from ptqd.runtime.schedulers import make_scheduler, resolve

    cond = b.facts.conditioning
    max_steps = min(1000, make_scheduler(b.facts.schedule.alphas_cumprod, resolve(b.facts.sampler, "auto")).max_steps())
    return ServeSpec(kind=cond.kind, num_classes=int(cond.num_classes or 0), null_class=int(cond.null_class or 0),
                     precisions=tuple(precisions), max_steps=max_steps, max_num=max_num,
                     default_guidance=7.5 if cond.kind == "text" else 3.0)


def build_app(b, precisions: list[str], backend: str, replicas: int, threads: int, max_batch: int,
              wait_ms: float, max_num: int):
    """The Serve application for bundle ``b`` (checked here, before any replica starts)."""
    spec = serve_spec(b, precisions, max_num)
    gen = serve.deployment(Generator, name="generator", num_replicas=replicas,
                           ray_actor_options={"num_cpus": threads}, max_ongoing_requests=max(2 * max_batch, 8),
                           health_check_period_s=2, health_check_timeout_s=30)
    ingress = serve.deployment(Ingress, name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=1000)
    info = {"bundle": str(b.root), "precisions": precisions, "backend": backend, "replicas": replicas,
            "max_batch": max_batch, "batch_wait_ms": wait_ms}
    return ingress.bind(gen.bind(str(b.root.resolve()), b.digest(), precisions, backend, threads, max_batch,
                                 wait_ms / 1000), spec, info)


def run_server(bundle, host: str = "127.0.0.1", port: int = 8000, precisions=("auto",), backend: str = "auto",
               replicas: int = 1, threads: int = 1, max_batch: int = 8, wait_ms: float = 50.0, max_num: int = 8,
               ray_address: str = "local", block: bool = True, log=print):
    """Start the server; with ``block``, serve until interrupted (Ctrl-C stops it and the Ray it started)."""
    import sys

    import ray

    from ptqd.bundle import Bundle, layout
    from ptqd.cluster import Cluster, connect
    from ptqd.errors import UserError
    from ptqd.runtime.loader import load_plan, resolve_backend

    b = Bundle.open(bundle)
    precisions = [("fp32" if p == "auto" and not b.has(layout.PLAN_JSON) else p) for p in precisions]
    needs = sorted({q for p in precisions for q in load_plan(b, p).precisions})
    backend = resolve_backend(b, backend, log=lambda m: print(m, file=sys.stderr), needs=needs)
    missing = [q for q in needs if q != "fp32" and q not in layout.built(b, backend)]
    if missing and backend != "tensorrt":
        raise UserError(f"--precisions: {b.root} has no {backend} engine for {', '.join(missing)}; build it with "
                        f"`ptqd build {b.root} --backend {backend}` or serve other precisions")
    app = build_app(b, precisions, backend, replicas, threads, max_batch, wait_ms, max_num)
    started = connect(Cluster(ray_address, replicas, threads))
    import logging

    quiet = {"log_level": "WARNING"}  # Serve's INFO lines (controller, every request) stay out of the terminal
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config=quiet)
    serve.run(app, name="ptqd", route_prefix="/", logging_config=quiet)
    log(f"serving {b.root} ({', '.join(precisions)} on {backend}; {replicas} replica(s) x {threads} thread(s), "
        f"batches of up to {max_batch} samples) at http://{host}:{port}: POST /generate, GET /health")
    if not block:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()

