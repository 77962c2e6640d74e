"""Comparing an engine with a reference, as a product feature: one tolerance table, one verdict.

Engine vs fake-quant ε, relative L2 per timestep. The fake-quant model emulates the integer kernels
exactly; the float ops around them (GroupNorm, SiLU, softmax) round differently in torch and ORT, and
now and then that moves an input across a quantization tie: a rare 1-LSB flip that the rest of the
network carries along. So: the median timestep must agree to float noise, the worst within 2e-2 for
8-bit activations and 1e-1 for 4-bit ones (a tie flip there moves a value by 1/15 of its range, not 1/255).
"""

from __future__ import annotations

import numpy as np

ENGINE_TOLERANCE = {"median_rel_l2": 1e-4, "worst_rel_l2": 2e-2, "worst_rel_l2_a4": 1e-1}
VALIDATION_TIMESTEPS = (1, 101, 251, 401, 501, 601, 751, 951)
CASCADE_SLACK = 1.25  # a rounding cascade passes when the engine is at most this much further from FP


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-12))


def validation_inputs(feeds: dict, count: int = len(VALIDATION_TIMESTEPS), per_step: int = 2) -> list[dict]:
    """Engine validation inputs from the calibration's own UNet inputs (``feeds``: x, t[, context] as
    in calib/feeds.npz): ``count`` timesteps spread over the calibrated schedule, ``per_step`` inputs
    each (the first of each half of a guided batch, so conditional and unconditional rows both take part).

    An engine is checked where it was calibrated: off that distribution (e.g. N(0, 1) latents at
    t = 1 for a model whose trajectories end far from N(0, 1)) its activations clip, the quantization
    noise dominates, and 1-LSB rounding differences between two exact-up-to-float-rounding
    implementations no longer stay small."""
    t = feeds["t"]
    steps = np.unique(t)[::-1]
    pick = steps[np.unique(np.linspace(0, len(steps) - 1, min(count, len(steps))).round().astype(int))]
    out = []
    for tv in pick:
        rows = np.flatnonzero(t == tv)
        half = rows[: max(1, len(rows) // 2)] if len(rows) > 1 else rows
        idx = np.unique([half[0], rows[len(rows) // 2]])[:per_step]
        f = {"x": feeds["x"][idx], "t": feeds["t"][idx]}
        if "context" in feeds:
            f["context"] = feeds["context"][idx]
        out.append(f)
    return out


class Memo:
    """A runner made on first use whose outputs on a fixed list of inputs are computed once each (keyed by the
    input array's identity, which the memo holds): the validation and the checks after it read the same outputs
    without running the model again. ``release()`` drops the runner, keeping the outputs."""

    def __init__(self, make):
        self.make, self.runner, self.out = make, None, {}

    def __call__(self, x, t, context=None):
        if id(x) not in self.out:
            if self.runner is None:
                self.runner = self.make()
            self.out[id(x)] = (x, self.runner(x, t, context))
        return self.out[id(x)][1]

    def release(self) -> None:
        self.runner = None


def validate_engine(runner, reference, inputs: list[dict], act_bits: int = 8) -> dict:
    """Engine vs a reference runner (the fake-quant model) on ``inputs`` (see :func:`validation_inputs`):
    rel-L2 and max abs error per input, their median and worst, and whether they pass ENGINE_TOLERANCE."""
    rows = []
    for f in inputs:
        got, ref = runner(f["x"], f["t"], f.get("context")), reference(f["x"], f["t"], f.get("context"))
        rows.append({"t": float(f["t"][0]), "max_abs": float(np.abs(got - ref).max()), "rel_l2": rel_l2(got, ref)})
    rel = [r["rel_l2"] for r in rows]
    return {"per_timestep": rows, "median_rel_l2": float(np.median(rel)), "worst_rel_l2": max(rel),
            "worst_max_abs": max(r["max_abs"] for r in rows), "inputs": "calibration trajectories (calib/feeds.npz)",
            "passed": float(np.median(rel)) <= ENGINE_TOLERANCE["median_rel_l2"]
            and max(rel) <= ENGINE_TOLERANCE["worst_rel_l2" if act_bits >= 8 else "worst_rel_l2_a4"]}


def validate_quantized(engine, reference, open_fp, kernels: dict, inputs: list[dict], act_bits: int) -> dict:
    """Engine vs its fake-quant model (end to end), given the integer-kernel check (``kernels``: see
    ``ptqd.engines.kernels.check_kernels``).

    Passes when the kernels are exact and their constants are the calibration's, and either ε agrees
    within ENGINE_TOLERANCE, or (a rounding cascade: see ``ptqd.engines.kernels``) the engine is no
    further from FP32 (``open_fp()``: the FP32 runner, made only then) than ``CASCADE_SLACK`` x its fake-quant model is."""
    val = validate_engine(engine, reference, inputs, act_bits=act_bits)
    val["tolerance"] = ENGINE_TOLERANCE
    val["kernels"] = kernels
    close = val["passed"]
    kernel_words = "every integer kernel exact" if kernels["kernels"] else "integer kernels not checked (backend)"
    if not kernels["passed"]:
        what = kernels["mismatched"][:3] or kernels["constant_mismatches"][:3]
        val["failure"] = (f"{len(kernels['mismatched'])} of {kernels['kernels']} integer kernels differ from their "
                          f"integer math, {len(kernels['constant_mismatches'])} constants differ from the calibration: "
                          f"{what}")
    elif not close:
        fp = open_fp()
        e_vs_fp, q_vs_fp = [], []
        for f in inputs:
            args = (f["x"], f["t"], f.get("context"))
            r = fp(*args)
            e_vs_fp.append(rel_l2(engine(*args), r))
            q_vs_fp.append(rel_l2(reference(*args), r))
        val["cascade"] = {"engine_vs_fp32_median": float(np.median(e_vs_fp)),
                          "fake_quant_vs_fp32_median": float(np.median(q_vs_fp)), "slack": CASCADE_SLACK}
        if np.median(e_vs_fp) <= CASCADE_SLACK * np.median(q_vs_fp):
            val["passed"] = True
            val["verdict"] = (f"rounding cascade: {kernel_words}, the engine no further from FP32 than "
                              "its fake-quant model")
        else:
            val["failure"] = (f"{kernel_words}, but ε differs from the fake-quant model by rel-L2 median "
                              f"{val['median_rel_l2']:.3g} (tolerance {ENGINE_TOLERANCE['median_rel_l2']:g}) and the "
                              f"engine is further from FP32 ({np.median(e_vs_fp):.3g}) than {CASCADE_SLACK:g} x its "
                              f"fake-quant model ({np.median(q_vs_fp):.3g})")
    if close and kernels["passed"]:
        val["verdict"] = f"exact: ε within tolerance of the fake-quant model, {kernel_words}"
    val["passed"] = bool(kernels["passed"] and val["passed"])
    return val
