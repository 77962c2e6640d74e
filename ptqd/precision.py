"""Precisions and backends: the one place that knows what a precision name means.

A precision's name says its numerics (``w4a8``: 4-bit weights per output channel, 8-bit activations per
tensor). The enums are ``str`` subclasses, so a member equals its name and goes into JSON as it is; code
asks ``Precision.parse(name).w_bits`` instead of reading characters out of the string.
"""

from __future__ import annotations

from enum import Enum

from ptqd.errors import UserError


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"  # TensorRT's unquantized baseline engine
    W8A8 = "w8a8"
    W4A8 = "w4a8"
    W4A4 = "w4a4"
    ORT_INT8 = "ort-int8"  # ONNX Runtime's own quantize_static: the peer a user would pick instead
    NNCF_INT8 = "nncf-int8"  # NNCF's default post-training recipe on OpenVINO: the CPU peer (optional: nncf)
    NNCF_MIXED = "nncf-mixed"  # NNCF's mixed preset with the transformer model type
    NNCF_HYBRID = "nncf-hybrid"  # optimum-intel's hybrid mode: linear layers weight-only, the rest quantized

    def __str__(self) -> str:
        return self.value

    @property
    def w_bits(self) -> int:
        return _BITS[self][0]

    @property
    def a_bits(self) -> int:
        return _BITS[self][1]

    @property
    def is_calibrated(self) -> bool:
        """Calibrated by ptqd (weights rounded, activation ranges, PTQD correction fitted)."""
        return self in CALIBRATED

    @classmethod
    def parse(cls, name: str | Precision, allowed=None, what: str = "precision") -> Precision:
        """``name`` as a Precision; a UserError listing the choices when it is unknown (or not ``allowed``)."""
        choices = tuple(allowed) if allowed is not None else tuple(cls)
        try:
            p = cls(name)
        except ValueError:
            p = None
        if p is None or p not in choices:
            raise UserError(f"unknown {what} {name!r}; choose from {', '.join(c.value for c in choices)}")
        return p


_BITS = {Precision.FP32: (32, 32), Precision.FP16: (16, 16), Precision.W8A8: (8, 8), Precision.W4A8: (4, 8),
         Precision.W4A4: (4, 4), Precision.ORT_INT8: (8, 8), Precision.NNCF_INT8: (8, 8),
         Precision.NNCF_MIXED: (8, 8), Precision.NNCF_HYBRID: (8, 8)}

# What ptqd calibrates and builds, in order of cost; the names as strings for JSON and CLI defaults.
CALIBRATED: tuple[Precision, ...] = (Precision.W8A8, Precision.W4A8, Precision.W4A4)
CALIBRATED_NAMES: tuple[str, ...] = tuple(p.value for p in CALIBRATED)
PEER = Precision.ORT_INT8
# NNCF's recipes on OpenVINO, built only when asked for (--precisions nncf-int8,nncf-mixed,nncf-hybrid): they need nncf
OV_PEERS: tuple[Precision, ...] = (Precision.NNCF_INT8, Precision.NNCF_MIXED, Precision.NNCF_HYBRID)
# the peers' engines quantize every conv and linear layer to 8 bits with their own ranges and weights
PEER_NAMES: tuple[str, ...] = (PEER.value,) + tuple(p.value for p in OV_PEERS)
ORT_BUILDABLE: tuple[Precision, ...] = CALIBRATED + (PEER,)
TENSORRT_BUILDABLE: tuple[Precision, ...] = (Precision.FP16,) + CALIBRATED
OPENVINO_BUILDABLE: tuple[Precision, ...] = CALIBRATED + OV_PEERS


def act_bits(name: str) -> int:
    """Activation bits of a precision, or of a plan (``auto``, a plan file): its lowest, 4, to be safe."""
    try:
        return Precision(name).a_bits
    except ValueError:
        return 4


class Backend(str, Enum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"
    OPENVINO = "openvino"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, name: str | Backend) -> Backend:
        try:
            return cls(name)
        except ValueError:
            raise UserError(f"--backend must be {' or '.join(b.value for b in cls)}, got {name!r}") from None
