"""Know before you die: each heavy stage's peak resident memory, estimated from the model before the
stage starts, against what the machine has available (:func:`ptqd.resources.available_bytes`).

A stage that will not fit stops at once with one line naming the flag that makes it fit, or drops to a
cheaper setting on its own and says so, instead of working for half an hour and being killed by the
kernel. The estimates are linear in three numbers of the model, read from its bundle:

* ``W``: bytes of the FP32 UNet graph (``unet.onnx`` and its external data);
* ``A``: bytes of every conv/linear/attention output of one batch item (the layer table's shapes);
* the calibration's Hessians (sum of K² over quantized layers, K = Cin·kh·kw, and the largest K).

Coefficients are fitted to whole-process-tree peaks measured on the cin256-v2 family at 47 M and 400.9 M
parameters (benchmarks/scale.py, docs/real-size.md) and round up, so they err on the side of
refusing a little early rather than being killed late. ``PTQD_MEMORY_AVAILABLE`` overrides what the
machine reports (see :mod:`ptqd.resources`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ptqd.errors import UserError
from ptqd.resources import GB, available_bytes

BASE = int(0.75 * GB)  # python + torch + onnxruntime imported, nothing loaded
MAX_PEER_CHUNK = 64  # calibration items per ONNX Runtime run of quantize_static's augmented graph
PEER_ACT_FACTOR = 4.5  # ORT's resident bytes per item over the layer outputs' bytes (measured: 47 M, batch 8/64)


@dataclass(frozen=True)
class ModelCost:
    """What the memory of every stage scales with."""

    weight_bytes: int  # W
    act_bytes: int  # A, per batch item
    hessian_bytes: int  # float32 H of every quantized layer at once
    max_k: int  # the largest H is max_k x max_k

    @classmethod
    def from_layers(cls, table: dict, weight_bytes: int | None = None) -> ModelCost:
        rows = table.get("layers", [])
        ks = [math.prod(r["weight_shape"][1:]) for r in rows if r.get("weight_shape")]
        wb = sum(math.prod(r["weight_shape"]) * 4 for r in rows if r.get("weight_shape"))
        return cls(weight_bytes=int(weight_bytes if weight_bytes is not None else wb),
                   act_bytes=sum(math.prod(r["out_shape"]) * 4 for r in rows if r.get("out_shape")),
                   hessian_bytes=sum(k * k * 4 for k in ks), max_k=max(ks, default=0))

    @classmethod
    def from_bundle(cls, b) -> ModelCost:
        from ptqd.bundle import layout

        w = sum(rec.get("size", 0) for rel, rec in b.files.items() if rel.startswith(layout.UNET_ONNX))
        return cls.from_layers(b.read_json(layout.UNET_LAYERS), w or None)


def export_peak(source_bytes: int) -> int:
    """torch model + its ONNX graph in memory twice (export, then the check against torch). Measured:
    1.14 GB at 47 M (189 MB), 7.69 GB at 400.9 M (1.6 GB)."""
    return BASE + int(4.5 * source_bytes)


def calibrate_peak(m: ModelCost, batch: int, hessian_mb: int) -> int:
    """torch model and its observers, the recorded calls of one chunk of ``batch`` trajectories (CFG
    doubles it), one group of Hessians (``hessian_mb`` at most) and the two K x K float32 temporaries of
    the largest layer's GPTQ."""
    return (BASE + int(1.5 * m.weight_bytes) + 2 * batch * m.act_bytes + min(hessian_mb << 20, m.hessian_bytes)
            + 2 * m.max_k ** 2 * 4)


LARGE_W = int(1.6e9)  # W of the 400.9 M model: past it, the large-model paths (external data, borrowed weights)


def past_large(w: int, below: float, above: float) -> int:
    """``below`` x W up to :data:`LARGE_W`, ``above`` x the rest: the stages hold fewer copies of the weights per
    byte past it (QDQ graphs and engines keep their weights in ``.data`` files, fake-quant models borrow the float
    weights, the export check frees torch's before ONNX Runtime loads its own)."""
    return int(below * min(w, LARGE_W) + above * max(0, w - LARGE_W))


def build_peak(m: ModelCost) -> int:
    """One of ptqd's engines at a time: QDQ graph, optimized engine, fake-quant torch model for the
    validation. Measured: 1.05 GB per engine at 47 M, 5.80 GB for three at 400.9 M; for SDXL's 2.57 B-parameter
    UNet at a 32x32 latent (W = 9.6 GiB; ``benchmarks/sdxl_compile_small.py``) 15.95 GiB for w8a8 and 18.58 GiB
    for the packed w4a8 (its int8 expansion passes 2 GB and goes to ONNX Runtime as arrays)."""
    return BASE + past_large(m.weight_bytes, 3.5, 1.5) + 2 * m.act_bytes


def peer_peak(m: ModelCost, chunk: int) -> int:
    """ONNX Runtime's ``quantize_static``: the model, its augmented copy and the session of that copy,
    run on ``chunk`` calibration items at once (the min/max reductions it keeps per item are scalars)."""
    return BASE + int(3.5 * m.weight_bytes) + int(PEER_ACT_FACTOR * chunk * m.act_bytes)


def sample_peak(m: ModelCost, batch: int) -> int:
    """correct and plan: the torch model and the engines of every precision, ``batch`` trajectories
    (CFG doubles them). Measured: 1.42 GB at 47 M, 5.68 GB at 400.9 M, 21.90 GiB for correct's fit and gate
    on SDXL's 2.57 B-parameter UNet at a 32x32 latent (W = 9.6 GiB), 13.0 GiB for its plan alone (which holds
    two engines at a time)."""
    return BASE + past_large(m.weight_bytes, 3.0, 1.9) + 2 * batch * m.act_bytes


def gb(n: float) -> str:
    return f"{n / GB:.1f} GiB"


def require(stage: str, need: int, fix: str) -> None:
    """Refuse ``stage`` in one line when its estimated peak ``need`` exceeds the available memory."""
    have, where = available_bytes()
    if have is not None and need > have:
        raise UserError(f"{stage} needs about {gb(need)} of memory and {gb(have)} is available ({where}); "
                        f"{fix}")


def peer_chunk(m: ModelCost) -> int | None:
    """Items per ONNX Runtime run for the ort-int8 peer: as many as take about 1 GiB of activations (at
    most 64, at least 1), fewer where the machine has less; None when even one item does not fit. The
    model alone decides the default, so the engine is the same on every machine with room for it. The
    ranges barely depend on it: MinMax takes the min and max over all items however they are batched
    (only the kernels' float rounding at another batch size differs, ~1e-7 relative)."""
    per = max(1, int(PEER_ACT_FACTOR * m.act_bytes))
    preferred = int(min(MAX_PEER_CHUNK, max(1, GB // per)))
    have, _ = available_bytes()
    if have is None or peer_peak(m, preferred) <= have:
        return preferred
    fit = (have - peer_peak(m, 0)) // per
    return int(fit) if fit >= 1 else None


def _lighter(pre) -> str:
    if "minimal" in pre.name:
        return "free memory (other jobs), or run it on a machine with more"
    return "--preset minimal needs less (fewer trajectories at once, smaller Hessian groups)"


def stage_need(stage: str, m: ModelCost, pre) -> tuple[int, str]:
    """(estimated peak bytes, how to make it fit) of ``stage`` under the compute preset ``pre``
    (``ptqd.budget.Budget``). The build's own line is :func:`build_peak` (its peer adapts instead)."""
    if stage == "calibrate":
        return calibrate_peak(m, pre.calib_batch, pre.hessian_mb), _lighter(pre)
    if stage in ("correct", "plan"):
        return sample_peak(m, pre.correct_batch), _lighter(pre)
    if stage == "build":
        return build_peak(m), "free memory (other jobs), or build on a machine with more; engines are built one " \
                              "at a time"
    raise ValueError(f"internal: no memory model for stage {stage!r}")


def require_stage(stage: str, m: ModelCost, pre) -> None:
    require(stage, *stage_need(stage, m, pre))
