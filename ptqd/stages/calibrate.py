"""``ptqd calibrate``: observe activations along FP trajectories, round the weights, and write the
quantization parameters of every precision (per timestep bucket), plus the calibration's own UNet inputs."""

from __future__ import annotations

from typing import Any

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.progress import progress_bar
from ptqd.runtime.loader import default_labels, sampler_config
from ptqd.stages.common import digest, load_source


@writes_bundle()
def calibrate(bundle, samples: int | None = None, steps: int | None = None, eta: float = 0.0,
              guidance: float = 3.0, method: str = "mse", rounding: str = "gptq", buckets: int = 1,
              device: str = "auto", preset: str = "auto", progress: bool | None = None,
              recipe: str | None = None, cluster=None, weight_grid: str = "portable", attention: str = "float") -> dict:
    """Observe activations along FP trajectories; write quantization parameters per precision.
    ``cluster``: pass 1's trajectory chunks run on Ray workers (:class:`ObserveWorker`), merged in chunk order.

    ``recipe`` (``calib.calibrate.RECIPES``, e.g. "ptqd-paper") replaces ``method`` and ``rounding``
    and sets the weight scales' granularity. ``weight_grid``: the 8-bit weights' grid (``reduce_range_for``).
    ``attention``: which attention matmuls run on 8-bit inputs in every precision (``calib.attention``).

    ``samples``/``steps`` default to the compute ``preset`` for the model's size (see ``ptqd.budget``).
    Memory is bounded: statistics for every layer, but second moments (H) only for one group of
    layers at a time (``observe``); ``device`` runs the torch work on a GPU where there is one."""
    import time
    from dataclasses import replace

    import numpy as np

    from ptqd import memory
    from ptqd.budget import preset_for
    from ptqd.calib.calibrate import (
        CalibConfig,
        bucket_steps,
        quantize_attention,
        quantize_layers,
        quantize_weights,
        reduce_range_for,
        save_params,
        select_layers,
        with_inputs,
    )
    from ptqd.calib.device import describe, resolve_device
    from ptqd.calib.observe import record_trajectories
    from ptqd.runtime.sampler import DDIMSampler

    b = Bundle.open(bundle)
    table = b.read_json(layout.UNET_LAYERS)
    pre = preset_for(preset, table)
    cfg = CalibConfig(samples=pre.calib_samples if samples is None else samples,
                      steps=pre.steps if steps is None else steps, eta=eta, guidance=guidance, method=method,
                      rounding=rounding, buckets=buckets, batch=pre.calib_batch,
                      reduce_range=reduce_range_for(weight_grid), attention=attention)
    if recipe is not None:
        import dataclasses

        from ptqd.calib.calibrate import recipe as recipe_options

        cfg = dataclasses.replace(cfg, **recipe_options(recipe))
    cfg.validate()
    dev = resolve_device(device)
    memory.require_stage("calibrate", memory.ModelCost.from_bundle(b), replace(pre, calib_batch=cfg.batch))
    facts = b.facts
    scfg = sampler_config(facts, cfg.steps, eta, guidance)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = load_source(b)
    selected = with_inputs(select_layers(table["layers"], cfg.keep_fp), b.path(layout.UNET_ONNX))
    from ptqd.calib.attention import check_order, selected_matmuls

    matmuls = selected_matmuls(table["layers"], cfg.attention, b.path(layout.UNET_ONNX))
    watch = [r["index"] for r in matmuls]
    labels = default_labels(facts, None, cfg.samples)
    chunks = cfg.seeds * -(-cfg.samples // cfg.batch)
    with progress_bar(chunks + len(selected), "calibrate", progress) as bar:
        bar.set_postfix_str(f"observing {len(selected)} layers over {cfg.steps} steps on {describe(dev)}")
        if cluster is None:
            rec = record_trajectories(loaded, selected, labels, np.arange(cfg.seeds), scfg, dev, batch=cfg.batch,
                                      progress=bar, attention=watch)
        else:
            rec = observe_sharded(b, cluster, selected, labels, np.arange(cfg.seeds), scfg, device, cfg.batch,
                                  progress, attention=watch)
            bar.update(chunks)
        if watch:
            check_order(rec.attention_seen, table["layers"])
        seconds["observe"] = round(time.perf_counter() - t0, 1)
        t1 = time.perf_counter()
        bar.set_postfix_str(f"H + {cfg.rounding} weights, layer groups of <= {pre.hessian_mb} MB"
                            if cfg.rounding != "nearest" else "nearest weights (no H)")
        weights = quantize_weights(loaded, selected, rec, cfg, dev, feeds_items=pre.hessian_items,
                                   budget_bytes=pre.hessian_mb << 20, progress=bar)
        seconds["weights"] = round(time.perf_counter() - t1, 1)
        t1 = time.perf_counter()
        feeds = rec.feeds
        record: dict[str, Any] = {"config": {k: v for k, v in cfg.__dict__.items()}, "layers": len(selected),
                                  "attention_matmuls": len(matmuls),
                                  "calibration_inputs": sum(len(f[0]) for f in feeds), "precisions": {},
                                  "device": describe(dev), "preset": pre.name}
        sampler = DDIMSampler(facts.schedule.alphas_cumprod, scfg.spacing)
        sampler.set_timesteps(cfg.steps)
        groups = bucket_steps(cfg.steps, buckets)
        record["buckets"] = [{"steps": g, "t_range": [int(sampler.timesteps[g[-1]]), int(sampler.timesteps[g[0]])]}
                             for g in groups]
        with Bundle.transaction(b.root) as w:
            for rel in w.listed("calib/") + w.listed("engines/"):
                w.remove(rel)  # a new calibration replaces the old one whole, and the engines built from it go
            for stage in ("build", "build_openvino", "build_tensorrt", "correct", "plan"):
                w.drop_stage(stage)
            ranges: dict = {}
            for p in cfg.precisions:
                first = None
                for k, g in enumerate(groups):
                    layers = quantize_layers(loaded, selected, rec.obs, cfg, p, weights,
                                             steps=None if buckets == 1 else g, range_cache=ranges)
                    first = first or layers
                    meta, arrays = save_params(layers)
                    if matmuls:
                        meta["attention"] = [q.to_json() for q in quantize_attention(
                            matmuls, rec, cfg, steps=None if buckets == 1 else g, range_cache=ranges)]
                    meta["bucket"] = record["buckets"][k]
                    meta_rel, arrays_rel = layout.calib_params(p, k, buckets)
                    w.write_json(meta_rel, meta)
                    w.write_bytes(arrays_rel, layout.npz_bytes(arrays))
                errs = {k: float(np.mean([lq.errors[k] for lq in first if k in lq.errors]))
                        for k in first[0].errors}
                record["precisions"][p] = {"mean_layer_rel_error": errs}
            # per-step input ranges: what timestep buckets would have to absorb
            record["per_step_input_range"] = {
                o.name: {int(s): [st.lo, st.hi] for s, st in sorted(o.inputs.items())} for o in rec.obs.values()}
            inputs = {"x": np.concatenate([f[0] for f in feeds]), "t": np.concatenate([f[1] for f in feeds])}
            if feeds[0][2] is not None:
                inputs["context"] = np.concatenate([f[2] for f in feeds])
            w.write_bytes(layout.CALIB_FEEDS, layout.npz_bytes(inputs, compressed=True))
            seconds["ranges_and_write"] = round(time.perf_counter() - t1, 1)
            seconds["total"] = round(time.perf_counter() - t0, 1)
            record["seconds"] = seconds
            w.write_json(layout.CALIBRATION_JSON, record)
            w.set_stage("calibrate", {**{k: record[k] for k in ("config", "layers", "calibration_inputs", "buckets",
                                                                "seconds", "device", "preset")},
                                      "inputs": digest(b, (layout.UNET_ONNX, layout.UNET_LAYERS))})
    return record


class ObserveWorker:
    """A Ray worker of calibration's pass 1: the source model loaded once; ``run(chunks)`` records those trajectory
    chunks exactly as one process does (each chunk subsamples with its own random stream)."""

    def __init__(self, root: str, digest: str, selected: list, labels, seeds, cfg, device: str, threads: int,
                 batch: int, attention: list | None = None):
        import torch

        from ptqd.calib.device import resolve_device

        torch.set_num_threads(threads)
        b = Bundle.open(root)
        b.check_digest(digest)
        self.loaded, self.dev = load_source(b), resolve_device(device)
        self.selected, self.labels, self.seeds, self.cfg, self.batch = selected, labels, seeds, cfg, batch
        self.attention = attention

    def run(self, chunks):
        from ptqd.calib.observe import record_trajectories

        rec = record_trajectories(self.loaded, self.selected, self.labels, self.seeds, self.cfg, self.dev,
                                  batch=self.batch, chunks=chunks, attention=self.attention)
        return rec, sum(stop - s0 for _, s0, stop in chunks)


def observe_sharded(b, cluster, selected, labels, seeds, scfg, device: str, batch: int, progress, attention=None):
    """Pass 1 on Ray workers: one trajectory chunk per shard, recordings merged in chunk order."""
    from ptqd.calib.observe import Recording, trajectory_chunks
    from ptqd.cluster import run_shards

    chunks = trajectory_chunks(labels, seeds, batch)
    init = (str(b.root.resolve()), b.digest(), selected, labels, seeds, scfg, device, cluster.threads, batch,
            attention)
    parts = run_shards(cluster, ObserveWorker, init, [[c] for c in chunks], len(seeds) * len(labels),
                       "calibrate (FP trajectories)", progress)
    return Recording.merge(parts)
