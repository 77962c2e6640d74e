"""The runtime: numpy sampler + engine runners. No torch here (``TorchRunner`` is imported explicitly)."""

from ptqd.runtime.pipeline import decode, grid, sample_latents, to_uint8
from ptqd.runtime.runners import OrtDecoder, OrtRunner, Runner
from ptqd.runtime.sampler import DDIMSampler, NoiseSource, SamplerConfig

__all__ = ["DDIMSampler", "NoiseSource", "SamplerConfig", "Runner", "OrtRunner", "OrtDecoder", "sample_latents",
           "decode", "grid", "to_uint8"]
