"""TensorRT options and the one place TensorRT is imported (``require_tensorrt``)."""

from __future__ import annotations

from dataclasses import dataclass

from ptqd.errors import MissingDependencyError, UserError

INSTALL_HINT = "pip install tensorrt polygraphy (on a machine with an NVIDIA GPU and CUDA)"
TRT_OPSET = 21  # INT4 / block-quantized DequantizeLinear (ONNX 21); TensorRT 10.15 parses opsets 9..24
INT4_BLOCK_SIZES = (128, 64)  # TensorRT's INT4 block sizes, largest first
KEEP_FP32_INPUTS = ("t",)  # graph inputs whose exclusive downstream path (time embedding) stays FP32
TIMING_CACHE = "timing.cache"


def require_tensorrt():
    """Import TensorRT or raise MissingDependencyError with one line saying what to install."""
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError(f"the tensorrt backend needs TensorRT: {INSTALL_HINT}") from None
    try:
        import polygraphy  # noqa: F401
    except ImportError:  # pragma: no cover - polygraphy is a ptqd dependency
        raise MissingDependencyError(f"the tensorrt backend needs polygraphy: {INSTALL_HINT}") from None
    return trt


# ---- options ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtOptions:
    """How the TensorRT graphs and plans are made. Batch sizes count *sampler* samples per call:
    classifier-free guidance runs the UNet on the conditional and unconditional halves together,
    so with ``cfg`` the profile's opt and max batches are doubled (the min is not: unguided calls).
    Calls larger than the profile's max are split by the runner, so ``max_batch`` is a speed knob."""

    min_batch: int = 1
    opt_batch: int = 4
    max_batch: int = 16
    cfg: bool = True
    float_dtype: str = "float16"  # unquantized layers: "float16" (what TensorRT is for) or "float32"
    int4_matmul: bool = True  # 4-bit MatMul weights as true INT4 (weight-only); False: int8 grid + act Q/DQ
    builder_optimization_level: int | None = None  # TensorRT's default (3) when None
    workspace_bytes: int | None = None  # the builder's workspace pool limit; TensorRT's default when None

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise UserError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {self.min_batch}, "
                            f"{self.opt_batch}, {self.max_batch}")
        if self.float_dtype not in ("float16", "float32"):
            raise UserError(f"float_dtype must be float16 or float32, got {self.float_dtype!r}")
        if self.builder_optimization_level is not None and not 0 <= self.builder_optimization_level <= 5:
            raise UserError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise UserError(f"workspace_bytes must be > 0, got {self.workspace_bytes}")

    @property
    def profile_batches(self) -> tuple[int, int, int]:
        """(min, opt, max) of the UNet's batch dimension: CFG doubles opt and max."""
        k = 2 if self.cfg else 1
        return self.min_batch, k * self.opt_batch, k * self.max_batch
