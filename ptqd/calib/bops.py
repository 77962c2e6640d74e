"""BOPs: bit operations per UNet forward, PTQD's cost measure.

BOPs = Σ over conv and linear layers of MACs × weight bits × activation bits (batch 1). Layers a
precision leaves in float (skip and downsample convs, embedding Gemms) count 32 × 32; the
attention matmuls (activation × activation) are not conv or linear layers and are not counted,
as in the paper, so FP32 LDM-4 ImageNet comes to 99.77 GMAC × 1024 = 102.2 TBOPs.

Bits are nominal: an 8-bit weight on the reduce-range grid (±63) counts as 8 bits.
"""

from __future__ import annotations

from ptqd.precision import PEER_NAMES

COUNTED_KINDS = ("conv", "linear")


def layer_bits(rows: list[dict], precision: str, calibrated: list[dict] | None = None) -> dict[str, tuple[int, int]]:
    """Layer name -> (weight bits, activation bits) for ``precision``; absent layers are float.

    ``calibrated``: the layers of calib/<precision>.json (what the engine really quantizes); without
    it, ptqd's default layer selection predicts them (``ptqd inspect`` on a bundle not calibrated)."""
    if precision in ("fp32", "fp16"):
        return {}
    if precision == "nncf-hybrid":  # linear layers weight-only (int8 weights decompressed, float products)
        return {r["name"]: (8, 8) for r in rows if r["kind"] == "conv"}
    if precision in PEER_NAMES:  # quantize_static or NNCF: every Conv / linear MatMul / Gemm at 8 bits
        return {r["name"]: (8, 8) for r in rows if r["kind"] in COUNTED_KINDS}
    if calibrated is not None:
        return {m["name"]: (int(m["w_bits"]), int(m["a_bits"])) for m in calibrated}
    from ptqd.calib.calibrate import EIGHT_BIT_ROLES, PRECISIONS, quantized_in, select_layers

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    wb, ab = PRECISIONS[precision]
    return {r["name"]: (8, 8) if r["role"] in EIGHT_BIT_ROLES else (wb, ab)
            for r in quantized_in(select_layers(rows), precision)}


def bops(rows: list[dict], bits: dict[str, tuple[int, int]], float_bits: int = 32) -> float:
    """BOPs of one forward at batch 1 (MACs from the layer table)."""
    total = 0.0
    for r in rows:
        if r["kind"] in COUNTED_KINDS:
            wb, ab = bits.get(r["name"], (float_bits, float_bits))
            total += r["macs"] * wb * ab
    return total
