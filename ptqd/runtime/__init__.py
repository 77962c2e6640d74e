"""The runtime: numpy sampler + engine runners. No torch here (the torch reference runner lives in
``ptqd.engines.torch_ref`` and is imported explicitly)."""

from ptqd.engines.onnxruntime import OrtDecoder, OrtRunner
from ptqd.engines.runner import Runner
from ptqd.runtime.pipeline import decode, grid, sample_latents, to_uint8
from ptqd.runtime.sampler import DDIMSampler, NoiseSource, SamplerConfig

__all__ = ["DDIMSampler", "NoiseSource", "SamplerConfig", "Runner", "OrtRunner", "OrtDecoder", "sample_latents",
           "decode", "grid", "to_uint8"]
