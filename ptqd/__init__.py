"""ptqd: a deployment compiler for post-training-quantized latent diffusion models (PTQD).

Importing ``ptqd`` is light: torch, onnxruntime and TensorRT load only when a stage needs
them. The public API is in :mod:`ptqd.api`; the command line in :mod:`ptqd.cli`.
"""

__version__ = "0.1.0"
