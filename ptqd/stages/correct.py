"""``ptqd correct``: fit PTQD's correction (k_t, bias_t[c], σ_q,t) for every calibrated precision."""

from __future__ import annotations

from typing import Any

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.progress import progress_bar
from ptqd.runtime.correction import CorrectionTable
from ptqd.runtime.loader import default_labels, open_engine
from ptqd.stages.common import (check_sampler_option, digest, fake_quant_runners, fit_sampler_config, load_source,
                                require_calibrated)
from ptqd.validate import real


def check_gate_options(gate_samples: int | None, gate_ranges: int | None, gate_budget: float | None = None) -> None:
    """One-line errors for the gate's options (None: the preset's)."""
    if gate_samples is not None and (isinstance(gate_samples, bool) or not isinstance(gate_samples, int)
                                     or gate_samples < 0):
        raise UserError(f"--gate-samples must be an integer >= 0 (0: no gate), got {gate_samples!r}")
    if gate_ranges is not None and (isinstance(gate_ranges, bool) or not isinstance(gate_ranges, int)
                                    or gate_ranges < 1):
        raise UserError(f"--gate-ranges must be an integer >= 1, got {gate_ranges!r}")
    if gate_budget is not None:
        real("--gate-budget", gate_budget, 0)


def gate_config(pre, samples: int, gate_samples: int | None = None, gate_ranges: int | None = None,
                gate_budget: float | None = None) -> dict:
    """The gate's settings as correct.json records them: explicit options over the preset ``pre``'s (its
    gate_samples None: 2 x the correction's ``samples``). ``samples`` 0: no gate. ``budget_s``: the wall
    time the gate is narrowed to fit (``calib.gate.size_gate``; 0: no limit)."""
    from ptqd.calib.gate import GATE_BUDGET_S

    check_gate_options(gate_samples, gate_ranges, gate_budget)
    if gate_samples is None:
        gate_samples = 2 * samples if pre.gate_samples is None else pre.gate_samples
    return {"samples": gate_samples, "ranges": pre.gate_ranges if gate_ranges is None else gate_ranges,
            "candidates": ["+".join(c) for c in pre.gate_candidates],
            "budget_s": float(GATE_BUDGET_S if gate_budget is None else gate_budget)}


def sized_gate(engine, facts, table, scfg, batch: int, seed: int, gcfg: dict, precisions: int, log) -> dict:
    """The gate's settings narrowed to its time budget (``calib.gate.size_gate``) from a timed short run
    on ``engine``; one line through ``log`` when they were narrowed. The record correction.json keeps."""
    from ptqd.calib.correction import resumable
    from ptqd.calib.gate import gate_etas, sample_run_seconds, size_gate

    per_run = sample_run_seconds(engine, facts, table, default_labels(facts, None, batch), seed, scfg, batch)
    cands = tuple(tuple(c.split("+")) for c in gcfg["candidates"])
    etas, noisy = gate_etas(scfg)
    n, ranges, cands, est, narrowed = size_gate(gcfg["samples"], gcfg["ranges"], cands, per_run, precisions,
                                                gcfg["budget_s"], len(etas), resumable(scfg), len(noisy))
    if narrowed:
        (log or print)(f"correct: gate narrowed to fit its {gcfg['budget_s']:.0f} s budget ({', '.join(narrowed)}; "
                       f"{per_run * 1e3:.1f} ms per sample run, about {est:.0f} s); --gate-budget 0 for the "
                       "preset's whole gate")
    return {"samples": n, "ranges": ranges, "candidates": ["+".join(c) for c in cands], "estimated_s": round(est, 1),
            "seconds_per_sample_run": per_run, "narrowed": narrowed}


@writes_bundle()
def correct(bundle, samples: int | None = None, holdout: int | None = None, seed: int = 1,
            batch: int | None = None, device: str = "auto", preset: str = "auto",
            progress: bool | None = None, gate: bool = True, gate_samples: int | None = None,
            gate_seed: int = 101, gate_ranges: int | None = None, gate_budget: float | None = None,
            log=None, cluster=None, shard_size: int | None = None, sampler: str = "auto") -> dict[str, Any]:
    """Fit PTQD's correction (k_t, bias_t[c], σ_q,t) for every calibrated precision; write
    calib/correction.json. Runs the source FP model and each precision's fake-quant model on the
    same x_t along FP trajectories of the calibrated steps and guidance on ``sampler`` (auto: the bundle's own,
    a pipeline's scheduler, else DDIM on CompVis spacing; see ``fit_sampler_config``), seeds distinct from
    the calibration's; the last ``holdout`` samples only measure the fit. ``samples``, ``holdout`` and
    ``batch`` default to the compute ``preset`` (``ptqd.budget``); the torch models run on ``device``.

    Also fits the conditional correction, and, with ``gate`` and the engines built, decides what
    ``--correction auto`` applies from final samples of ``gate_samples`` held-out trajectories of seed
    ``gate_seed`` at η 0 and 1 over ``gate_ranges`` step ranges (``calib.gate``; both default to the preset's,
    ``gate_samples=0`` skips the gate, and then auto applies nothing). The gate is narrowed to take about
    ``gate_budget`` seconds (default ``calib.gate.GATE_BUDGET_S``; 0: no limit) from the measured time of a
    sampler step on the engine, and ``log`` says so in one line when it is. ``cluster``: the FP trajectories
    run as shards of ``shard_size`` (default ``batch``) on Ray workers (:class:`CollectWorker`), concatenated in
    index order; the gate stays in this process."""
    import time
    from dataclasses import replace

    import numpy as np

    from ptqd import memory
    from ptqd.budget import preset_for
    from ptqd.calib.correction import collect, fit_conditional, fit_precision
    from ptqd.calib.device import describe, resolve_device
    from ptqd.calib.gate import gate_engine
    from ptqd.engines.torch_ref import TorchRunner

    check_sampler_option(sampler)
    b = Bundle.open(bundle)
    cal = require_calibrated(b)
    pre = preset_for(preset, b.read_json(layout.UNET_LAYERS))
    samples = pre.correct_samples if samples is None else samples
    holdout = pre.holdout if holdout is None else holdout
    batch = pre.correct_batch if batch is None else batch
    gcfg = gate_config(pre, samples, gate_samples, gate_ranges, gate_budget)
    gate_samples, gate_ranges = gcfg["samples"], gcfg["ranges"]
    gate = gate and gate_samples > 0
    if samples < 2 or not 1 <= holdout < samples:
        raise UserError(f"--samples must be >= 2 and --holdout in [1, samples - 1], got {samples} and {holdout}")
    c = cal["config"]
    facts = b.facts
    scfg = fit_sampler_config(facts, c["steps"], c["eta"], c["guidance"], sampler)
    precisions = layout.calibrated_precisions(b)
    dev = resolve_device(device)
    memory.require_stage("correct", memory.ModelCost.from_bundle(b), replace(pre, correct_batch=batch))
    t0 = time.perf_counter()
    table = layout.class_embedding(b)
    labels = default_labels(facts, None, samples)
    if cluster is not None:
        ts, eps, delta = collect_sharded(b, cluster, shard_size or batch, batch, precisions, device, labels, seed,
                                         scfg, progress)
    else:
        loaded = load_source(b)
        quant = fake_quant_runners(b, loaded, precisions, dev)
        with progress_bar(samples * scfg.steps, "correct", progress) as bar:
            bar.set_postfix_str(f"FP vs {', '.join(precisions)} on the same x_t")
            ts, eps, delta = collect(TorchRunner(loaded.unet, dev), quant, facts, table, labels, seed, scfg,
                                     batch=batch, progress=bar)
    collect_seconds = round(time.perf_counter() - t0, 1)
    fits = {p: fit_precision(eps, delta[p], ts, holdout) for p in precisions}
    for p in precisions:  # the conditional correction (--correction conditional), same data
        fits[p]["conditional"] = fit_conditional(eps, delta[p], ts, holdout)
    if gate:  # what --correction auto applies: decided on final samples of held-out seeds (calib/gate.py)
        built = layout.built(b)
        gated = [p for p in precisions if p in built]
        fp_eng = open_engine(b, "fp32", allow_spinning=False) if gated else None
        with progress_bar(len(gated), "gate", progress) as gbar:
            for p in gated:
                gbar.set_postfix_str(f"{p}: final samples, corrected vs not")
                eng = open_engine(b, p, allow_spinning=False)
                if p == gated[0]:  # the gate's size from the measured cost of a sampler step on this engine
                    gcfg["sized"] = sized_gate(eng, facts, table, scfg, batch, gate_seed, gcfg, len(gated), log)
                    gate_samples, gate_ranges = gcfg["sized"]["samples"], gcfg["sized"]["ranges"]
                    candidates = tuple(tuple(c.split("+")) for c in gcfg["sized"]["candidates"])
                    gl = default_labels(facts, None, gate_samples)
                fits[p]["gate"] = gate_engine(eng, fp_eng, CorrectionTable.from_json(fits[p]), facts, table, gl,
                                              gate_seed, scfg, ranges=gate_ranges, batch=batch,
                                              candidates=candidates)
                eng.close()
                gbar.update()
        if fp_eng is not None:
            fp_eng.close()
    summary = {}
    for p, f in fits.items():
        h = [s["holdout"] for s in f["steps"]]
        summary[p] = {"explained_variance_holdout": float(np.mean([x["explained_variance"] for x in h])),
                      "eps_mse_uncorrected_holdout": float(np.mean([x["mse_uncorrected"] for x in h])),
                      "eps_mse_corrected_holdout": float(np.mean([x["mse_corrected"] for x in h])),
                      "eps_mse_gated_holdout": float(np.mean([s["holdout_gated"]["mse_corrected"]
                                                              for s in f["steps"]])),
                      "k_raw_range": [min(s["raw"]["k_raw"] for s in f["steps"]),
                                      max(s["raw"]["k_raw"] for s in f["steps"])],
                      "gates": {g: sum(s["gate"] == g for s in f["steps"]) for g in ("none", "k", "bias", "k+bias")},
                      "sigma_q_range": [min(s["sigma_q"] for s in f["steps"]), max(s["sigma_q"] for s in f["steps"])],
                      "eps_mse_conditional_holdout": float(np.mean([s["holdout"]["mse_corrected"]
                                                                    for s in f["conditional"]["steps"]]))
                      if f["conditional"]["steps"] else None,
                      "applied": [("+".join(s["parts"]) or "none") for s in f["gate"]["steps"]]
                      if "gate" in f else "no gate (" + ("engine not built" if gate else "gate off: --gate-samples 0 or "
                                                         "the minimal preset") + "): nothing applied under --correction auto"}
    record = {"config": {"samples": samples, "holdout": holdout, "seed": seed, "steps": scfg.steps,
                         "gate": {**gcfg, "seed": gate_seed} if gate else None,
                         "eta": scfg.eta, "guidance": scfg.guidance, "spacing": scfg.spacing,
                         "sampler": scfg.sampler_name, "sampler_option": sampler or "auto",
                         "model": "fake-quant torch model of each precision (engines match it; see build.json)"},
              "summary": summary, "precisions": fits, "seconds": round(time.perf_counter() - t0, 1),
              "collect_seconds": collect_seconds, "sharded": cluster.describe() if cluster is not None else None,
              "device": describe(dev), "preset": pre.name}
    with Bundle.transaction(b.root) as w:
        # The previous plan stays until `plan` replaces it: still a valid plan (its engines are built),
        # and its record's inputs no longer match correction.json, so compile recomputes it.
        w.write_json(layout.CORRECTION_JSON, record)
        w.set_stage("correct", {"config": record["config"], "inputs": digest(b, layout.CALIB_FILES),
                                "summary": summary, "seconds": record["seconds"]})
    return record


class CollectWorker:
    """A Ray worker of ``correct``'s FP trajectories: the source model and each precision's fake-quant model, loaded
    once; ``run((start, stop))`` collects ε and Δ of trajectories start..stop-1 exactly as one process does."""

    def __init__(self, root: str, digest: str, precisions: list[str], device: str, threads: int, labels, seed: int,
                 cfg, batch: int):
        import torch

        from ptqd.calib.device import resolve_device
        from ptqd.engines.torch_ref import TorchRunner

        torch.set_num_threads(threads)
        b = Bundle.open(root)
        b.check_digest(digest)
        dev = resolve_device(device)
        loaded = load_source(b)
        self.quant = fake_quant_runners(b, loaded, precisions, dev)
        self.fp = TorchRunner(loaded.unet, dev)
        self.facts, self.table = b.facts, layout.class_embedding(b)
        self.labels, self.seed, self.cfg, self.batch = labels, seed, cfg, batch

    def run(self, shard):
        from ptqd.calib.correction import collect

        s, e = shard
        _, eps, delta = collect(self.fp, self.quant, self.facts, self.table, self.labels[s:e], self.seed, self.cfg,
                                batch=self.batch, start=s)
        return (eps, delta), e - s


def collect_sharded(b, cluster, shard_size: int, batch: int, precisions, device: str, labels, seed: int, cfg,
                    progress):
    """``collect`` over Ray workers: shards of whole batches, ε and Δ concatenated in trajectory order."""
    import numpy as np

    from ptqd.calib.correction import trajectory_timesteps
    from ptqd.cluster import index_shards, run_shards

    shards = index_shards(len(labels), shard_size, batch)
    init = (str(b.root.resolve()), b.digest(), list(precisions), device, cluster.threads, labels, seed, cfg, batch)
    parts = run_shards(cluster, CollectWorker, init, shards, len(labels), "correct (FP trajectories)", progress)
    steps = len(parts[0][0])
    eps = [np.concatenate([p[0][i] for p in parts]) for i in range(steps)]
    delta = {q: [np.concatenate([p[1][q][i] for p in parts]) for i in range(steps)] for q in precisions}
    return trajectory_timesteps(b.facts, cfg), eps, delta
