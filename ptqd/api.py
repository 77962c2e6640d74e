"""The Python API: one function per stage and the runtime's entry points, re-exported from where they
live (``ptqd.stages``, ``ptqd.runtime``, ``ptqd.tools``). The CLI is a thin shell over these.

    from ptqd import api
    api.compile("model.ckpt", "m.bundle")                  # export -> calibrate -> build -> correct -> plan
    images, labels = api.sample("m.bundle", precision="auto", num=16)
    pipe = api.Pipeline.from_bundle("m.bundle")              # load once, call many times
    pipe(class_labels=[1, 2], seed=0).images
    api.evaluate("m.bundle", precisions=("fp32", "w8a8", "auto"))
"""

from ptqd.bundle.layout import BUILD_JSON, CLASS_EMBEDDING, FIRST_STAGE_ONNX, UNET_LAYERS, UNET_ONNX
from ptqd.engines.compare import CASCADE_SLACK, ENGINE_TOLERANCE, validate_engine, validation_inputs
from ptqd.runtime.generate import sample, write_samples
from ptqd.runtime.loader import default_labels, open_engine, sampler_config, step_engines
from ptqd.runtime.pipe import Pipeline, PipelineOutput
from ptqd.stages.build import build
from ptqd.stages.build_tensorrt import build_tensorrt, lint
from ptqd.stages.calibrate import calibrate
from ptqd.stages.compile import compile
from ptqd.stages.correct import correct
from ptqd.stages.export import export, parse_schedule
from ptqd.stages.pack import pack
from ptqd.stages.plan import bops_table, plan
from ptqd.tools.demo import demo, train_demo
from ptqd.tools.evaluate import ablation, evaluate
from ptqd.tools.inspect import inspect

__all__ = [
    "BUILD_JSON", "Pipeline", "PipelineOutput", "CASCADE_SLACK", "CLASS_EMBEDDING", "ENGINE_TOLERANCE", "FIRST_STAGE_ONNX", "UNET_LAYERS",
    "UNET_ONNX", "ablation", "bops_table", "build", "build_tensorrt", "calibrate", "compile", "correct",
    "default_labels", "demo", "evaluate", "export", "inspect", "lint", "open_engine", "pack", "parse_schedule", "plan",
    "sample", "sampler_config", "step_engines", "train_demo", "validate_engine", "validation_inputs",
    "write_samples",
]
