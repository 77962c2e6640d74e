"""Where the torch stages (calibrate, correct, the fake-quant reference) run: ``--device auto|cpu|cuda``.

``auto`` is the first CUDA GPU when torch sees one, else the CPU. Results on either device agree
within the engines' validation tolerance: every reduction that decides a quantization grid runs in
float32 (TF32 is switched off on CUDA, so matmuls and convolutions keep float32's 24-bit mantissa,
which the fake-quant model's integer accumulation relies on; see ``fakequant``).
"""

from __future__ import annotations

from ptqd.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str = "auto"):
    """A ``torch.device`` for ``spec`` ("auto", "cpu", "cuda" or "cuda:N"); a clear error when it is not there."""
    import torch

    spec = str(spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec}: torch sees no CUDA GPU (torch.cuda.is_available() is False; this "
                            "torch build or machine has none); use --device cpu or --device auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        # float32 everywhere: TF32 would round the fake-quant model's integer accumulations
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return dev
    raise UserError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got {spec!r}")


def describe(device) -> str:
    """One line for records and progress bars: 'cpu (2 threads)' or 'cuda:0 (NVIDIA H200)'."""
    import torch

    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    return f"cpu ({torch.get_num_threads()} threads)"
