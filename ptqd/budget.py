"""Compute budgets: how many trajectories calibrate, correct and plan run, per model size.

The work of the three torch/engine stages grows with (samples x steps x MACs per forward): the
demo UNet (20 MMAC) affords 64 correction trajectories in seconds, the full-size LDM-4 UNet
(104 GMAC) spends about 2.5 s per sample-forward on 2 CPU cores. ``--budget auto`` (the default)
picks a preset by the model's MACs per forward; any preset can be named explicitly, and explicit
``--samples``/``--steps`` override it.

| preset   | calibration trajectories | steps | correction (held out) | gate (ranges)     | plan trajectories | auto for    |
|----------|--------------------------|-------|-----------------------|-------------------|-------------------|-------------|
| thorough | 64                       | 20    | 128 (32)              | 256 (4)           | 128               | -           |
| default  | 32                       | 20    | 64 (16)               | 128 (4)           | 64                | < 1 GMAC    |
| quick    | 8                        | 20    | 8 (2)                 | 16 (1; bias, k+b) | 4                 | 1 - 30 GMAC |
| minimal  | 4                        | 10    | 4 (1)                 | none              | 1                 | >= 30 GMAC  |

The gate decides what ``--correction auto`` applies from final samples (``calib/gate.py``); without it
(``minimal``, or ``--gate-samples 0``) auto applies nothing, which is never worse than uncorrected.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ptqd.errors import UserError


# the parts the correction gate tries per step range (calib/gate.py), unless a preset narrows them
GATE_CANDIDATES: tuple[tuple[str, ...], ...] = (("k",), ("bias",), ("k", "bias"), ("cond",))


@dataclass(frozen=True)
class Budget:
    name: str
    calib_samples: int
    steps: int
    correct_samples: int
    holdout: int
    plan_samples: int
    calib_batch: int = 32  # trajectories per chunk while observing (memory of the activations)
    correct_batch: int = 32
    hessian_mb: int = 2048  # float32 H matrices held at once (one group of layers)
    hessian_items: int = 64  # batch items of each recorded call replayed for H (all of them up to 64)
    # the end-to-end correction gate (calib/gate.py): held-out trajectories (None: 2 x correct_samples;
    # 0: no gate, so --correction auto applies nothing), step ranges, and the parts it tries
    gate_samples: int | None = None
    gate_ranges: int = 4
    gate_candidates: tuple[tuple[str, ...], ...] = GATE_CANDIDATES

    def to_json(self) -> dict:
        return dict(self.__dict__)


PRESETS = {
    "thorough": Budget("thorough", 64, 20, 128, 32, 128),
    "default": Budget("default", 32, 20, 64, 16, 64),
    # quick: one step range and the two parts the demo's gates ever kept (about 7 sampling runs per precision
    # instead of 26; k alone and the conditional correction never helped end to end)
    "quick": Budget("quick", 8, 20, 8, 2, 4, calib_batch=8, correct_batch=8, gate_samples=16, gate_ranges=1,
                    gate_candidates=(("bias",), ("k", "bias"))),
    "minimal": Budget("minimal", 4, 10, 4, 1, 1, calib_batch=4, correct_batch=4, hessian_items=4, gate_samples=0),
}
BUDGETS = ("auto", *PRESETS)
AUTO_GMAC = ((1.0, "default"), (30.0, "quick"))  # MACs per forward below -> preset; above the last: minimal


def macs_per_forward(layer_table: dict) -> float:
    return float(sum(r.get("macs") or 0 for r in layer_table.get("layers", [])))


def auto_preset(macs: float) -> str:
    for limit, name in AUTO_GMAC:
        if macs < limit * 1e9:
            return name
    return "minimal"


def preset_for(spec: str | None, layer_table: dict | None = None) -> Budget:
    """The preset named ``spec`` ("auto": by the model's MACs per forward from its layer table)."""
    spec = spec or "auto"
    if spec == "auto":
        name = auto_preset(macs_per_forward(layer_table or {}))
        return replace(PRESETS[name], name=f"auto ({name})")
    if spec not in PRESETS:
        raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got {spec!r}")
    return PRESETS[spec]
