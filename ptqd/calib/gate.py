"""End-to-end gate of the noise correction: what the runtime applies, decided on final samples.

The per-step fit (``calib.correction``) says how well k_t, bias_t[c] or the conditional model
explain the ε error at each step, but a lower ε error at a step does not make the final sample
closer to FP's (on the demo, k + bias lowered every step's held-out ε MSE and still moved w4a8's
samples further from FP). So, as the measured plan decides bits, the gate decides the correction by
its effect on the final latents, paired with FP's on the same noise, over held-out seeds that
neither the fit nor an evaluation uses:

  err(config, η) = per sample, mean over elements of (x_0(config) − x_0(FP))²   [N]

where ``config`` gives the parts applied at each step (``()`` = uncorrected). Greedy over step
ranges, in sampling order (early steps first: their choice sets the later steps' inputs):

  1. for range r, with the ranges before it as decided and the ones after it uncorrected, try each
     candidate (k, bias, k+bias, cond); the paired difference to the current config,
     d = err(candidate) − err(current), averaged over η ∈ {0, 1} per sample, must be below zero
     by ``z`` (default 3, see ``Z``) standard errors, and its mean must not be positive at any single η.
     Or, second route: its mean is not positive at any η and it brings the distribution of the final
     latents closer to FP's (``moment_distance``: per-element means and standard deviations over the
     samples) by ``z`` paired-bootstrap standard errors, lower at every η. A bias or VSC moves the
     distribution (FD vs FP) much more than single samples (paired PSNR): on the demo's final engines
     PTQD's raw fit halved w4a4's FD vs FP for +0.2 dB of PSNR, which the paired test alone could not
     resolve on the gate's samples. The best candidate is kept (those lowering the paired error first,
     by their delta); otherwise the range stays as it is.
  2. VSC (where the sampler injects noise: DDIM at η = 1, Euler ancestral): per range, adding "vsc" to the
     kept parts, same rule there.
  3. The final config against the uncorrected one, same rule; if it fails, nothing is applied.

A part that does not clearly help is not applied: "all off" is a valid, honest outcome. Every
measured mean and standard error is returned as evidence (``correction.json``, ``gate``).

The gate runs the sampler the correction was fitted on (the bundle's own; ``stages.common.fit_sampler_config``).
η ∈ {0, 1} is DDIM's; another sampler is gated at its one setting (η 0), and VSC is tried there where it is
stochastic (Euler ancestral). On DDIM a candidate for range r resumes from the cached latents at r's start
(``ResumedError``), so it costs the steps from r to the end, not a full run: on the demo (20 steps, 4 ranges,
4 candidates, η ∈ {0, 1}, VSC pass, final check) about 500 sampler steps per precision, 25 full runs. Multistep
samplers keep history and cannot resume: each candidate runs whole.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import numpy as np

from ptqd.budget import GATE_CANDIDATES

# Standard errors a part must win by. About 25 comparisons per precision (5 candidates x 4 ranges, VSC
# per range, the final check): at z = 3 each wrongly keeps a useless part with probability 0.00135
# (one-sided, normal), about 3% for the whole gate, twice that with the distribution route (a second
# test per comparison); at z = 2 it was 0.023 each, and on the demo a VSC range the gate kept at 2.1 SE
# made the plan's paired PSNR worse on the evaluation seeds.
Z = 3.0
BOOTSTRAPS = 200  # resamples for the distribution criterion's standard error
DEFAULT_CANDIDATES = GATE_CANDIDATES

Config = tuple[tuple[str, ...], ...]
ErrorFn = Callable[[Config, float], np.ndarray]


def step_ranges(steps: int, ranges: int) -> list[tuple[int, int]]:
    """``ranges`` contiguous [start, stop) step ranges of (nearly) equal length."""
    ranges = max(1, min(int(ranges), steps))
    cuts = np.linspace(0, steps, ranges + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in pairwise(cuts) if b > a]


def paired_error(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per sample, the mean over elements of (x − ref)²: final latents against FP's on the same noise. [N]"""
    d = (np.asarray(x, np.float64) - ref) ** 2
    return d.reshape(len(d), -1).mean(1)


def moment_distance(x: np.ndarray, ref: np.ndarray) -> float:
    """How far the distribution of samples ``x`` [N, ...] is from FP's ``ref`` (same shape, same noise):
    per latent element, the squared difference of the means and of the standard deviations over samples,
    averaged. A cheap, paired stand-in for FD vs FP on latents (what a bias or VSC changes)."""
    x, ref = x.reshape(len(x), -1), ref.reshape(len(ref), -1)
    return float(np.mean((x.mean(0) - ref.mean(0)) ** 2 + (x.std(0) - ref.std(0)) ** 2))


def compare_distribution(finals, new, old, etas, boots: int = BOOTSTRAPS, seed: int = 0) -> dict:
    """``finals(config, eta)`` -> (final latents [N, ...], FP's on the same noise). ``delta`` = moment
    distance of new − old, averaged over ``etas``; ``se`` its paired bootstrap standard error (the same
    resampled sample indices for new, old and FP)."""
    data = {eta: (finals(new, eta)[0], *finals(old, eta)) for eta in etas}
    n = len(next(iter(data.values()))[0])

    def delta(idx):
        return {eta: moment_distance(a[idx], r[idx]) - moment_distance(b[idx], r[idx]) for eta, (a, b, r) in data.items()}

    full = delta(np.arange(n))
    rng = np.random.default_rng(seed)
    boot = [float(np.mean(list(delta(rng.integers(0, n, n)).values()))) for _ in range(boots)]
    return {"delta": float(np.mean(list(full.values()))), "se": float(np.std(boot, ddof=1)),
            "delta_per_eta": {f"eta{eta:g}": v for eta, v in full.items()}}


def compare(error, new, old, etas, z: float | None = None, finals=None) -> dict:
    """Paired comparison of two configs: ``delta`` = mean over samples of the per-sample error
    difference new − old averaged over ``etas``, its standard error, the mean per η, and ``helps``:
    no η with a positive mean, and delta < −z·se. With ``finals`` (see :func:`compare_distribution`)
    a config that does not lower the paired error that clearly also helps when it brings the samples'
    distribution closer to FP's by z bootstrap standard errors at every η, without raising the paired
    error (its mean ≤ 0 at every η): a bias or VSC moves a distribution more than single samples."""
    z = Z if z is None else z
    d = {eta: np.asarray(error(new, eta), np.float64) - np.asarray(error(old, eta), np.float64) for eta in etas}
    comb = np.mean([d[eta] for eta in etas], axis=0)
    n = len(comb)
    se = float(comb.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    mean = float(comb.mean())
    per_eta = {f"eta{eta:g}": float(d[eta].mean()) for eta in etas}
    not_worse = all(v <= 0 for v in per_eta.values())
    out = {"delta": mean, "se": se, "delta_per_eta": per_eta, "helps": bool(mean < -z * se and not_worse)}
    if finals is not None and not out["helps"] and not_worse:
        dist = compare_distribution(finals, new, old, etas)
        dist["helps"] = bool(dist["delta"] < -z * dist["se"] and all(v < 0 for v in dist["delta_per_eta"].values()))
        out["distribution"] = dist
        out["helps"] = dist["helps"]
    return out


def _score(row: dict) -> tuple[int, float]:
    """Rank of a helping candidate: those that lower the paired error first, by how much; then those
    that help the distribution only, by how much."""
    dist = row.get("distribution")
    return (0, row["delta"]) if dist is None else (1, dist["delta"])


def gate(error: ErrorFn, steps: int, ranges: list[tuple[int, int]],
         candidates=DEFAULT_CANDIDATES, etas=(0.0, 1.0), z: float = Z, vsc: bool = True, finals=None,
         noisy: tuple[float, ...] | None = None) -> dict:
    """Decide the parts applied per step (see the module doc). ``error(config, eta)``: per-sample
    paired error of the final samples; ``finals(config, eta)`` -> (final latents, FP's), for the
    distribution criterion of :func:`compare` (None: paired error only). ``noisy``: the η's at which the
    sampler injects noise, where VSC is tried (None: those > 0, DDIM's rule). Returns {"parts": [tuple per
    step], "ranges": [...evidence], "vsc": [...], "final": {...}, "reference_error": {eta: mean error
    uncorrected}}."""
    cache: dict = {}

    def err(cfg: Config, eta: float) -> np.ndarray:
        key = (cfg, eta)
        if key not in cache:
            cache[key] = np.asarray(error(cfg, eta), np.float64)
        return cache[key]

    off: Config = tuple(() for _ in range(steps))
    parts = list(off)

    def with_range(r: tuple[int, int], cand) -> Config:
        p = list(parts)
        for i in range(*r):
            p[i] = tuple(cand)
        return tuple(p)

    evidence = []
    for r in ranges:
        cur = tuple(parts)
        rows = []
        for cand in candidates:
            rows.append({"parts": list(cand), **compare(err, with_range(r, cand), cur, etas, z, finals)})
        good = [x for x in rows if x["helps"]]
        best = min(good, key=_score) if good else None
        if best is not None:
            parts = list(with_range(r, best["parts"]))
        evidence.append({"steps": list(r), "candidates": rows, "kept": best["parts"] if best else []})
    vsc_rows = []
    noisy = tuple(e for e in etas if e > 0) if noisy is None else tuple(noisy)
    if vsc and noisy:
        for r in ranges:
            cur = tuple(parts)
            cand = tuple(dict.fromkeys(parts[r[0]] + ("vsc",)))
            new = with_range(r, cand)
            row = {"steps": list(r), "parts": list(cand), **compare(err, new, cur, noisy, z, finals)}
            if row["helps"]:
                parts = list(new)
            vsc_rows.append(row)
    final = tuple(parts)
    check = compare(err, final, off, etas, z, finals) if final != off else {"helps": False, "delta": 0.0}
    if final != off and not check["helps"]:
        parts = list(off)
    return {"parts": [tuple(p) for p in parts], "ranges": evidence, "vsc": vsc_rows, "final": check,
            "reference_error": {f"eta{eta:g}": float(err(off, eta).mean()) for eta in etas},
            "samples": len(err(off, etas[0])), "z": z}


class ResumedError:
    """``error(config, eta)`` for :func:`gate` from a sampler that can resume.

    ``sample(config, eta, start, observe)`` -> final latents [N, ...]: run the sampler with
    ``config[i]`` the parts at step i, from ``start=(i, x)`` (None: from x_T), calling
    ``observe(i, x)`` with the latents before each step. ``reference(eta)`` -> FP's final latents.
    The latents before each step in ``keep`` (the range starts) are cached per config prefix: they
    depend only on the parts of the steps before, so a candidate for a later range resumes there."""

    def __init__(self, sample, reference, keep):
        self.sample, self.reference, self.keep = sample, reference, set(keep)
        self.states: dict = {}
        self.refs: dict = {}
        self.finals: dict = {}
        self.steps_run = 0

    def __call__(self, config: Config, eta: float) -> np.ndarray:
        if eta not in self.refs:
            self.refs[eta] = np.asarray(self.reference(eta), np.float64)
        start, first = None, 0
        for i in sorted(self.keep, reverse=True):
            x = self.states.get((eta, config[:i]))
            if x is not None:
                start, first = (i, x), i
                break

        def observe(i, x):
            if i in self.keep and i > first:
                self.states.setdefault((eta, config[:i]), np.array(x, copy=True))

        out = np.asarray(self.sample(config, eta, start, observe if self.keep else None), np.float64)
        self.steps_run += len(config) - first
        self.finals[(config, eta)] = out
        return paired_error(out, self.refs[eta])

    def final(self, config: Config, eta: float) -> tuple[np.ndarray, np.ndarray]:
        """(final latents of ``config``, FP's) at ``eta``, from the run that measured its error."""
        if (config, eta) not in self.finals:
            self(config, eta)
        return self.finals[(config, eta)], self.refs[eta]


# The gate's cost follows the model's: its work is sized from the measured cost of one sampler step
GATE_BUDGET_S = 150.0  # default wall time of the whole gate (every precision) before it is narrowed
MIN_GATE_SAMPLES = 16
NARROW_CANDIDATES: tuple[tuple[str, ...], ...] = (("bias",), ("k", "bias"))  # the two parts gates ever kept


def gate_etas(cfg, etas=None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(η's the gate compares at: ``etas``, or by default DDIM's 0 and 1 and another sampler's one setting, η 0;
    those of them where ``cfg``'s sampler injects noise: DDIM's η > 0, every η of Euler ancestral)."""
    if cfg.spec is None or cfg.spec.cls == "DDIMScheduler":
        etas = (0.0, 1.0) if etas is None else tuple(etas)
        return etas, tuple(e for e in etas if e > 0)
    etas = (0.0,) if etas is None else tuple(etas)
    return etas, (etas if cfg.spec.cls == "EulerAncestralDiscreteScheduler" else ())


def gate_runs(ranges: int, candidates: int, etas: int = 2, resume: bool = True, noisy: int = 1) -> float:
    """Sampling runs of :func:`gate_engine` for one precision, in whole runs (a candidate resumed at its
    range's start counts the part it runs): per η the FP reference, the uncorrected engine and every
    candidate of every range; the VSC pass at the ``noisy`` η's (the final check reuses what those ran).
    ``resume`` False (multistep samplers): every candidate runs whole."""
    share = (ranges + 1) / 2 if resume else ranges
    return etas * (2 + candidates * share) + noisy * share


def size_gate(samples: int, ranges: int, candidates, seconds_per_sample_run: float, precisions: int,
              budget_s: float, etas: int = 2, resume: bool = True,
              noisy: int = 1) -> tuple[int, int, tuple, float, list[str]]:
    """Narrow the gate until its estimated time fits ``budget_s``: first the two candidates gates ever
    kept, then one step range, then fewer held-out samples (not below 16). ``seconds_per_sample_run``:
    one sample through every step (CFG included), measured on the engine. Returns (samples, ranges,
    candidates, estimated seconds, what was narrowed). ``etas``, ``resume``, ``noisy``: as :func:`gate_runs`."""
    def cost(n, r, c):
        return precisions * gate_runs(r, len(c), etas, resume, noisy) * n * seconds_per_sample_run

    candidates, changed = tuple(candidates), []
    if budget_s <= 0 or cost(samples, ranges, candidates) <= budget_s:
        return samples, ranges, candidates, cost(samples, ranges, candidates), changed
    if len(candidates) > len(NARROW_CANDIDATES):
        candidates = tuple(c for c in NARROW_CANDIDATES)
        changed.append(f"candidates {'/'.join('+'.join(c) for c in candidates)}")
    if cost(samples, ranges, candidates) > budget_s and ranges > 1:
        ranges = 1
        changed.append("1 step range")
    if cost(samples, ranges, candidates) > budget_s and samples > MIN_GATE_SAMPLES:
        fit = int(budget_s / cost(1, ranges, candidates))
        samples = max(MIN_GATE_SAMPLES, min(samples, fit // 8 * 8))
        changed.append(f"{samples} samples")
    return samples, ranges, candidates, cost(samples, ranges, candidates), changed


def sample_run_seconds(runner, facts, class_embedding, labels, seed: int, cfg, batch: int) -> float:
    """Seconds for one sample to go through all of ``cfg``'s steps on ``runner`` (CFG included), from a
    short timed run of two steps at the gate's batch (after one warm-up call)."""
    import dataclasses
    import time

    from ptqd.runtime.pipeline import sample_latents, scheduler_for

    n = int(min(batch, len(labels)))
    short = dataclasses.replace(cfg, steps=2, eta=0.0)
    idx = np.arange(n)
    sample_latents(runner, facts, class_embedding, np.asarray(labels)[:1], idx[:1], seed, short)  # warm-up
    t0 = time.perf_counter()
    sample_latents(runner, facts, class_embedding, np.asarray(labels)[:n], idx, seed, short)
    calls = len(scheduler_for(facts, short).timesteps), len(scheduler_for(facts, cfg).timesteps)  # PNDM: steps + 1
    return (time.perf_counter() - t0) / (calls[0] * n) * calls[1]


def gate_engine(runner, fp_runner, table, facts, class_embedding, labels, seed: int, cfg, ranges: int = 4,
                candidates=DEFAULT_CANDIDATES, etas=None, z: float = Z, batch: int = 64,
                distribution: bool = True) -> dict:
    """The gate for one engine (ONNX Runtime or any runner) and its fitted ``CorrectionTable``:
    final latents of ``labels`` with noise seed ``seed`` (held out: neither the fit's nor an
    evaluation's), on the sampler config ``cfg`` (the fit's) at each η (None: :func:`gate_etas`'s).
    Returns :func:`gate`'s record plus ``steps`` = [{"t", "parts"}] for correction.json, one per distinct
    timestep of the sampler."""
    import dataclasses

    from ptqd.calib.correction import resumable, trajectory_timesteps
    from ptqd.runtime.correction import Plan, StepEngines
    from ptqd.runtime.pipeline import sample_latents

    ts = trajectory_timesteps(facts, cfg)
    etas, noisy = gate_etas(cfg, etas)
    labels = np.asarray(labels)
    rs = step_ranges(len(ts), ranges)
    if table.a is None:
        candidates = tuple(c for c in candidates if "cond" not in c)

    def run(engine, eta, start=None, observe=None):
        """Final latents in batches; ``observe(i, x)`` gets the whole set's latents before step i."""
        c = dataclasses.replace(cfg, eta=eta)
        out, seen = [], {}
        for s0 in range(0, len(labels), batch):
            idx = np.arange(s0, min(len(labels), s0 + batch))
            st = None if start is None else (start[0], start[1][idx])

            def keep(i, t, x, ctx, e):
                seen.setdefault(i, []).append(x.copy())

            out.append(sample_latents(engine, facts, class_embedding, labels[idx], idx, seed, c,
                                      observe=keep if observe is not None else None, start=st))
        if observe is not None:
            for i, xs in seen.items():
                observe(i, np.concatenate(xs))
        return np.concatenate(out)

    def sample(config, eta, start, observe):
        parts = {float(t): p for t, p in zip(ts, config)}
        table.parts = [parts.get(float(t), ()) for t in table.t]
        eng = StepEngines({"q": runner}, Plan.fixed("q"), {"q": table}, use=("k", "bias", "vsc", "cond"))
        return run(eng, eta, start, observe)

    def reference(eta):
        return run(fp_runner, eta)

    fn = ResumedError(sample, reference, [r[0] for r in rs] if resumable(cfg) else [])
    try:
        rec = gate(fn, len(ts), rs, candidates, etas, z, finals=fn.final if distribution else None, noisy=noisy)
    finally:
        table.parts = None
    rec["steps"] = [{"t": t, "parts": list(p)} for t, p in zip(ts, rec.pop("parts"))]
    rec["engine_steps_run"] = fn.steps_run
    rec["seed"] = seed
    rec["etas"] = list(etas)
    rec["sampler"] = cfg.sampler_name
    return rec


def gate_plan(engines_on, engines_off, fp_runner, facts, class_embedding, labels, seed: int, cfg,
              etas=None, z: float = Z, batch: int = 64) -> dict:
    """The mixed-precision plan with each precision's gated correction (``engines_on``, a
    ``StepEngines``) against the same plan uncorrected (``engines_off``), on final samples of the
    gate's held-out seed, by :func:`compare`'s two routes (paired error, distribution): the gates were
    decided per precision, the plan mixes them. Returns :func:`compare`'s record; ``helps`` False means
    the plan runs uncorrected under ``auto``."""
    import dataclasses

    from ptqd.runtime.pipeline import sample_latents

    labels = np.asarray(labels)
    etas = gate_etas(cfg, etas)[0]

    def final(engine, eta):
        c = dataclasses.replace(cfg, eta=eta)
        return np.concatenate([sample_latents(engine, facts, class_embedding, labels[i:i + batch],
                                              np.arange(i, min(len(labels), i + batch)), seed, c)
                               for i in range(0, len(labels), batch)]).astype(np.float64)

    refs = {eta: final(fp_runner, eta) for eta in etas}
    engines = {"on": engines_on, "off": engines_off}
    finals: dict = {}

    def finals_of(name, eta):
        if (name, eta) not in finals:
            finals[(name, eta)] = final(engines[name], eta)
        return finals[(name, eta)], refs[eta]

    def error(name, eta):
        return paired_error(*finals_of(name, eta))

    rec = compare(error, "on", "off", etas, z, finals=finals_of)
    rec.update({"samples": len(labels), "seed": seed, "etas": list(etas)})
    return rec
