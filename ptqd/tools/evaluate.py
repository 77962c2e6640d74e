"""``ptqd eval``: quality of engines and plans against FP on the same seeds and classes, and PTQD's
ablation (each part of the correction on and off). Uses the public runtime like a user would."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.precision import CALIBRATED_NAMES, PEER_NAMES
from ptqd.progress import progress_bar
from ptqd.runtime.loader import (default_labels, load_plan, open_decoder, open_engine, resolve_backend,
                                 sampler_config, step_engines)
from ptqd.stages.plan import plan_bops, precision_bops
from ptqd.cluster import index_shards, run_shards
from ptqd.tools.metrics import (EvalTotals, FeatureModel, Gaussian, eval_batch, eval_config, evaluate_runners,
                                frechet_distance)
from ptqd.validate import sampling_counts


@writes_bundle(when="write_report")
def evaluate(bundle, precisions=("fp32",), num: int = 500, seed: int = 0, steps: int = 20, eta: float = 0.0,
             guidance: float = 3.0, classes=None, features: str | os.PathLike | None = None, batch: int = 100,
             progress: bool | None = None, write_report: bool = True, correction: str | tuple = "auto",
             rows: list[tuple[str, str | tuple]] | None = None, report_name: str = "eval",
             vsc_direction: str = "sigma", eps_mse: bool = True, backend: str = "auto",
             sampler: str = "auto", cluster=None, shard_size: int | None = None) -> dict[str, Any]:
    """Quality rows for ``precisions`` (engines, ``auto`` for the plan, or plan files) against FP (always
    the first row) on the same seeds and classes. ``correction`` applies to every row; ``rows``, a list
    of (precision, correction) pairs, replaces ``precisions`` for mixed settings (the ablation). ``backend``
    runs the quantized rows (onnxruntime or openvino); the FP32 reference is always ONNX Runtime's. ``sampler``:
    ``auto`` (the bundle's own) or a sampler name, for every row. ``cluster``: a :class:`ptqd.cluster.Cluster`
    runs shards of ``shard_size`` samples (default ``batch``; whole batches) on Ray workers and merges their sums in
    index order: the same rows as a single-process run."""
    sampling_counts(num=num, batch=batch, seed=seed)
    b = Bundle.open(bundle)
    facts = b.facts
    wanted = [p for p, _ in rows] if rows is not None else list(precisions)
    backend = resolve_backend(b, backend, log=lambda m: print(m, file=sys.stderr),
                              needs=sorted({q for p in wanted for q in load_plan(b, p).precisions}))
    cfg = dataclasses.replace(sampler_config(facts, steps, eta, guidance, sampler), vsc_direction=vsc_direction)
    cfg.validate(facts.schedule.num_train_timesteps)
    labels = default_labels(facts, list(classes) if classes else None, num)
    rows = [(str(Path(p).resolve()) if p.endswith(".json") else p, c)  # a plan file, as workers elsewhere see it
            for p, c in (rows if rows is not None else [(p, correction) for p in precisions])]
    feat_path = Path(features) if features else (b.path(layout.DEMO_FEATURES) if b.has(layout.DEMO_FEATURES) else None)
    if feat_path is not None and not feat_path.exists():
        raise UserError(f"--features {feat_path}: file not found")
    shards = index_shards(num, shard_size or batch, batch) if cluster is not None else None
    ev = RowEngines(b, rows, backend, feat_path) if cluster is None else None
    fmodel = ev.features if ev is not None else FeatureModel(feat_path) if feat_path is not None else None
    rf, reference = (real_reference(b, fmodel, num, seed) if b.has(layout.DEMO_REAL) and fmodel is not None
                     else (None, {}))
    real = Gaussian.of(rf) if rf is not None else None
    if ev is not None:
        try:
            with progress_bar(num, report_name, progress) as bar:
                res = evaluate_runners(facts, ev.table, ev.runners, ev.decoder, labels, seed, cfg, batch=batch,
                                       features=ev.features, real_features=rf, progress=bar, eps_mse=eps_mse)
            specs = ev.specs
        finally:
            ev.close()
    else:
        init = (str(b.root.resolve()), b.digest(), rows, backend, cluster.threads,
                None if feat_path is None else str(feat_path.resolve()), labels, seed, cfg, batch, eps_mse)
        totals, specs = EvalTotals(), {}

        def fold(_, part):  # in shard order, as results come: the sums of one process
            stats, names = part
            specs.update(names)  # label -> precision, as the workers' step_engines named the rows
            for st in stats:
                totals.add(st)

        run_shards(cluster, EvalWorker, init, shards, num, report_name, progress, consume=fold)
        res = totals.result(eval_config(num, seed, cfg), int(np.prod(facts.latent_shape)), real)
    res.reference = reference
    fp_bops = precision_bops(b, "fp32") if b.has(layout.UNET_LAYERS) else None
    for row in res.rows:
        spec = specs[row["precision"]]
        if fp_bops and (spec in ("fp32", "auto") or spec in CALIBRATED_NAMES + PEER_NAMES or spec.endswith(".json")):
            v = plan_bops(b, spec, cfg.steps, cfg)
            row["bops_per_forward"] = v
            row["bops_saving"] = fp_bops / v
    report = res.to_json()
    report["backend"] = str(backend)
    if write_report:
        with Bundle.transaction(b.root) as w:
            w.write_json(layout.report(report_name), report)
    return report


class RowEngines:
    """What an eval opens: FP32 (ONNX Runtime, the reference), each row's engines with its correction, the
    decoder, the conditioning table and the feature model."""

    def __init__(self, b, rows, backend: str, feat_path: Path | None, threads: int | None = None):
        self.runners = {"fp32": open_engine(b, "fp32", threads=threads, allow_spinning=False)}
        self.specs, self.cache = {"fp32": "fp32"}, {}
        for p, corr in rows:
            if p == "fp32" and corr in ("auto", "off"):
                continue
            eng, label = step_engines(b, p, corr, threads=threads, cache=self.cache, backend=backend)
            self.runners[label], self.specs[label] = eng, p
        self.decoder, self.table = open_decoder(b, threads), layout.class_embedding(b)
        self.features = FeatureModel(feat_path, threads) if feat_path is not None else None

    def close(self) -> None:
        for r in self.cache.values():
            r.close()


class EvalWorker:
    """A Ray worker of a sharded eval: a bundle's rows opened once; ``run((start, stop))`` returns the stats of
    each batch of the shard (the batches of the single-process run)."""

    def __init__(self, root: str, digest: str, rows, backend: str, threads: int, feat_path: str | None,
                 labels: np.ndarray, seed: int, cfg, batch: int, eps_mse: bool):
        b = Bundle.open(root)
        b.check_digest(digest)
        self.facts = b.facts
        self.ev = RowEngines(b, rows, backend, Path(feat_path) if feat_path else None, threads)
        self.labels, self.seed, self.cfg, self.batch, self.eps_mse = labels, seed, cfg, batch, eps_mse

    def run(self, shard):
        start, stop = shard
        ev, out = self.ev, []
        for s in range(start, stop, self.batch):
            idx = np.arange(s, min(stop, s + self.batch))
            out.append(eval_batch(self.facts, ev.table, ev.runners, ev.decoder, self.labels[idx], idx, self.seed,
                                  self.cfg, ev.features, self.eps_mse))
        return (out, ev.specs), stop - start


def real_reference(b, fmodel, num: int, seed: int):
    """The demo's held-out real images: their features and the FD between real halves (the noise floor)."""
    data = np.load(b.path(layout.DEMO_REAL))
    real = data["held_out_images"]
    rf, real_logits = fmodel(real)
    train_f = fmodel(data["train_images"])[0]
    rng = np.random.RandomState(seed)
    allf = np.concatenate([train_f, rf])
    perm = rng.permutation(len(allf))
    half = len(allf) // 2
    return rf, {
        "fd_real_half_vs_half": frechet_distance(allf[perm[:half]], allf[perm[half:]]),
        "fd_real_train_vs_held_out": frechet_distance(train_f[rng.choice(len(train_f), min(num, len(train_f)),
                                                                       replace=False)], rf),
        "held_out_images": int(len(real)),
        "classifier_acc_held_out": float((real_logits.argmax(1) == data["held_out_labels"]).mean()),
    }


def ablation(bundle, precisions=("w4a8", "w4a4", "auto"), num: int = 500, seed: int = 0, steps: int = 20,
             guidance: float = 3.0, batch: int = 100, progress: bool | None = None, cluster=None,
             shard_size: int | None = None) -> dict[str, Any]:
    """PTQD's ablation on one bundle, paired with FP on the same seeds: at η = 0 the uncorrected engine,
    + correlated correction (k), + bias; at η = 1 the uncorrected engine, + k + bias, + VSC."""
    rows0 = [(p, c) for p in precisions for c in ("off", ("k",), ("k", "bias"))]
    rows1 = [(p, c) for p in precisions for c in ("off", ("k", "bias"), ("k", "bias", "vsc"))]
    out = {}
    for eta, rows in ((0.0, rows0), (1.0, rows1)):  # on PTQD's DDIM (η 0 and 1), where the correction was fit
        out[f"eta{eta:g}"] = evaluate(bundle, num=num, seed=seed, steps=steps, eta=eta, guidance=guidance,
                                      batch=batch, progress=progress, rows=rows, report_name=f"ablation_eta{eta:g}",
                                      sampler=None, cluster=cluster, shard_size=shard_size)
    return out
