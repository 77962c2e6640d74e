"""ptqd: a deployment compiler for post-training-quantized latent diffusion models (PTQD).

Importing ``ptqd`` is light: torch, onnxruntime and TensorRT load only when a stage needs
them. The public API is in :mod:`ptqd.api` and ``ptqd.Pipeline`` (a bundle loaded once, called like a
diffusers pipeline); the command line in :mod:`ptqd.cli`.
"""

from ptqd.version import __version__  # noqa: F401


def __getattr__(name: str):
    if name == "Pipeline":  # a bundle loaded once, called like a diffusers pipeline (numpy + the engines)
        from ptqd.runtime.pipe import Pipeline

        return Pipeline
    raise AttributeError(f"module 'ptqd' has no attribute {name!r}")
