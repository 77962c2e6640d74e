"""OpenVINO engines (CPU): ptqd's QDQ graph converted to OpenVINO IR, 4-bit weights stored as i4.

OpenVINO reads ptqd's QDQ graph of the calibration with two changes from ONNX Runtime's
(:func:`openvino_layers`): conv outputs are not requantized (ONNX Runtime needs that requantization to fuse a conv
into its integer kernel, QLinearConv; OpenVINO's CPU plugin does not, and skipping it is 2-9 % faster there and one
rounding fewer per conv), and 8-bit inputs with negative values move to symmetric int8 grids (``ptqd build
--act-grid``: the plugin's faster int8 kernels; ``benchmarks/openvino_layouts.py``). A layer that reads its input
through Reshape/Transpose (a transformer's proj_out) gets its Q/DQ above them (``write_qdq(inputs_at="source")``),
so the Transposes move int8 values; that changes no value. The engine is validated
against the fake-quant model of exactly these layers. Its low-precision transformations run the quantized convs and
matmuls on int8 kernels (VNNI/AMX where the CPU has them) and everything else (GroupNorm, SiLU, the
residual adds, attention's core) in the engine's float precision (``INFERENCE_PRECISION_HINT``):

- ``f32``: what the fake-quant model computes; the engine is validated in f32.
- ``bf16``: on CPUs that compute bf16 natively (AVX512-BF16, AMX-BF16), where OpenVINO picks bf16 by default.
  The float parts move half the bytes; on an Intel Xeon with AMX the engines run 1.1-1.5x faster
  (``docs/backend-openvino.md``). The build keeps it only where the engine stays as close to FP32 as its
  f32 run (:func:`ptqd.stages.build_openvino.check_bf16`); on a CPU without native bf16 the engine runs in f32,
  the validated numerics, whatever its record says (:func:`float_precision_here`).

4-bit weights: every int8 weight tensor (2-D or more) whose values all lie in [-8, 7] is stored as an ``i4``
constant (two per byte in the ``.bin``) followed by a Convert to i8, so the graph the plugin compiles
is the int8 one and the file is the 4-bit one. The conversion is exact, so it is applied to every
precision (8-bit weights on the ±63 grid never fit, so w8a8 is unchanged).

The IR is portable; what is machine-specific (kernel choice, AMX or VNNI) is decided when the
engine is compiled at load, once per input shape. ``openvino`` is imported only here, lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from ptqd.engines.packed import pack_nibbles
from ptqd.engines.runner import Runner, unet_feeds
from ptqd.errors import MissingDependencyError, UserError

# compile settings of every ptqd OpenVINO engine: one stream, latency; the float precision is the engine's own
COMPILE_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
FLOAT_PRECISIONS = ("auto", "bf16", "f32")  # ptqd build --float-precision
MIN_PACKED = 64  # smaller constants (scales' companions, zero points) are not worth a node


def float_precision_here(recorded: str | None) -> str:
    """The float precision an engine recorded as ``recorded`` runs in on this CPU: bf16 only where the CPU
    computes it natively, else f32 (the numerics the engine was validated in, never an emulation)."""
    from ptqd.resources import has_native_bf16

    return "bf16" if recorded == "bf16" and has_native_bf16() else "f32"


def openvino_default_precision() -> str:
    """The float precision OpenVINO's CPU plugin picks by default on this CPU (bf16 where it is native): what a
    user of OpenVINO, or of NNCF + OpenVINO, gets without setting ``INFERENCE_PRECISION_HINT``."""
    return float_precision_here("bf16")


def signed_grid(a, max_step_growth: float):
    """``a`` (an 8-bit activation quantizer of a tensor with negative values) as a symmetric grid around 0
    (zero point 128, scale max(−lo, hi)/127: int8 with zero point 0 in the engine), or ``a`` itself where that
    would widen the step by more than ``max_step_growth`` (a tensor far from symmetric, e.g. after SiLU,
    whose lo is −0.28: there the symmetric step is 1.9x the asymmetric one, nearly a bit of resolution)."""
    from ptqd.calib.quant import ActQuant

    lo, hi = a.range
    if a.bits != 8 or lo >= 0 or a.int8_symmetric:
        return a
    scale = float(np.float32(max(-lo, hi) / 127))
    return ActQuant(scale, 128, 8) if scale <= max_step_growth * a.scale else a


def openvino_layers(layers, max_step_growth: float = 0.0) -> list:
    """The calibrated layers as ptqd's OpenVINO engine computes them: the same input quantizers and integer
    weights, each conv's output left in float (``act_out=None``: y = Σ (q_x − z_x)·q_w · s_x·s_w[c] + b, as the
    matmuls already are). Both the OpenVINO graph and the fake-quant model it is validated against are made
    from this list.

    ``max_step_growth`` (≥ 1 to act): an 8-bit input quantizer moves to a symmetric grid (:func:`signed_grid`)
    where that widens its step by at most this factor. OpenVINO's CPU plugin runs a conv or matmul whose input
    is int8 without a zero point on other kernels than one with a u8 input and a zero point (on an Intel Xeon
    with AMX: ``jit_avx512_amx`` convolutions and ``FullyConnectedQuantizedLegacy`` matmuls instead of
    ``brgconv`` and ``FullyConnected``), measured faster there (``docs/backend-openvino.md``)."""
    out = []
    for lq in layers:
        lq = dataclasses.replace(lq, act_out=None)
        a = signed_grid(lq.act_in, max_step_growth)  # a symmetric step is never narrower: below 1 nothing moves
        if a is not lq.act_in:
            moved = dataclasses.replace(lq, act_in=a)
            if lq.bias_q is not None:  # the same float bias on the new accumulator scale s_x·s_w
                bias = lq.bias_q.astype(np.float64) * lq.bias_scale.astype(np.float64)
                moved.bias_q = np.round(bias / moved.bias_scale.astype(np.float64)).astype(np.int32)
            lq = moved
        out.append(lq)
    return out


@functools.cache
def shared_core():
    """One ``openvino.Core`` per process, shared by every runner (a plan keeps several engines loaded)."""
    return require_openvino().Core()


def require_openvino():
    """The openvino module, or a one-line error saying how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("the openvino backend needs OpenVINO: pip install 'ptqd[openvino]' "
                                     "(or use --backend onnxruntime)") from None
    return ov


def pack_i4_constants(model) -> dict:
    """Replace, in place, each int8 weight constant (at least 2-D, MIN_PACKED values, all in [-8, 7]) by an
    i4 constant and a Convert to i8 (exact). Returns counts and bytes saved."""
    ov = require_openvino()
    from openvino import opset13

    n, saved = 0, 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Constant" or op.get_output_element_type(0) != ov.Type.i8:
            continue
        v = op.get_data()
        if v.ndim < 2 or v.size < MIN_PACKED or v.min() < -8 or v.max() > 7:
            continue  # weights only: per-channel zero points (1-D) stay as they are
        t = ov.Tensor(ov.Type.i4, ov.Shape(list(v.shape)))
        t.data[:] = np.frombuffer(pack_nibbles(v), np.int8).reshape(t.data.shape)
        packed = opset13.convert(ov.op.Constant(t), ov.Type.i8)
        packed.set_friendly_name(f"{op.get_friendly_name()}/i4")
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(packed.output(0))
        n += 1
        saved += v.size - (v.size + 1) // 2
    return {"i4_constants": n, "i4_bytes_saved": saved}


def weights_path(engine: str | os.PathLike) -> Path:
    """The ``.bin`` beside an engine's ``NAME.xml.gz`` (or ``NAME.xml``)."""
    p = Path(engine)
    return p.with_name(p.name.removesuffix(".gz").removesuffix(".xml") + ".bin")


def convert_qdq(qdq_path: str | os.PathLike, engine_path: str | os.PathLike) -> dict:
    """The QDQ ONNX graph at ``qdq_path`` as OpenVINO IR (:func:`save_engine`), 4-bit weights packed. Returns
    what was packed and the two files' names."""
    ov = require_openvino()
    model = ov.Core().read_model(str(qdq_path))
    rec = pack_i4_constants(model)
    return {**rec, "files": save_engine(model, engine_path)}


# NNCF's recipes by the name of the precision they build (the live peers of bench are "ov-" + that name)
NNCF_RECIPES = {"nncf-int8": "NNCF's default recipe", "nncf-mixed": "NNCF's mixed preset, transformer model type",
                "nncf-hybrid": "optimum-intel's hybrid mode for diffusion models: linear layers weight-only int8, the "
                               "rest by NNCF's mixed preset, transformer model type, SmoothQuant off"}


def weighted_matmuls(model) -> list[str]:
    """Names of the MatMuls with a constant operand (linear layers; attention's matmuls multiply activations)."""
    def constant(out) -> bool:
        node = out.get_node()
        while node.get_type_name() in ("Convert", "Transpose", "Reshape"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [op.get_friendly_name() for op in model.get_ordered_ops()
            if op.get_type_name() == "MatMul" and any(constant(op.input_value(i)) for i in range(2))]


def nncf_quantize(model, feeds: dict, items: int, recipe: str = "nncf-int8"):
    """NNCF's post-training quantization (``nncf.quantize``) of the OpenVINO ``model`` on ``items`` calibration
    inputs spread over ``feeds`` (the bundle's recorded UNet inputs, one item per call): what a user who picks
    NNCF + OpenVINO instead of ptqd gets. ``recipe``: a key of NNCF_RECIPES ("nncf-int8": its defaults,
    "nncf-mixed": its mixed preset with the transformer model type, "nncf-hybrid": what optimum-intel does for
    diffusion pipelines). NNCF's progress bars go to stderr."""
    import contextlib
    import sys

    try:
        import nncf
    except ImportError:
        raise MissingDependencyError("NNCF is not installed: pip install 'ptqd[peers]' (nncf)") from None
    names = [i.get_any_name() for i in model.inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise UserError(f"the calibration's recorded inputs have no {missing} for the UNet's inputs {names}: "
                        "rerun `ptqd calibrate` on this bundle")
    count = len(feeds[names[0]])
    idx = np.linspace(0, count - 1, min(items, count)).round().astype(int)
    data = [{n: feeds[n][i:i + 1] for n in names} for i in idx]
    kw = {"preset": nncf.QuantizationPreset.MIXED, "model_type": nncf.ModelType.TRANSFORMER} \
        if recipe in ("nncf-mixed", "nncf-hybrid") else {}
    log = logging.getLogger("nncf")
    level = log.level
    log.setLevel(logging.WARNING)  # its INFO lines list every node it leaves out: hundreds on a UNet
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout stays the command's (--json)
            return quantize_with(nncf, model, data, recipe, kw)
    finally:
        log.setLevel(level)


def quantize_with(nncf, model, data: list, recipe: str, kw: dict):
    """:func:`nncf_quantize`'s call into NNCF, on prepared data."""
    if recipe == "nncf-hybrid":  # as optimum-intel's _hybrid_quantization reads: weights first, then the rest
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        linear = weighted_matmuls(model)
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM,
                                      ignored_scope=nncf.IgnoredScope(types=["Convolution"]))
        kw = dict(kw, ignored_scope=nncf.IgnoredScope(names=linear, validate=False),
                  advanced_parameters=AdvancedQuantizationParameters(
                      smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1)))
    return nncf.quantize(model, nncf.Dataset(data), subset_size=len(data), **kw)


def save_engine(model, engine_path: str | os.PathLike) -> list[str]:
    """``model`` as ``NAME.xml.gz`` (the topology, gzip-compressed: the XML of a UNet is mostly shape arithmetic
    and compresses 20x) + ``NAME.bin`` (weights, as they are). Returns the two files' names."""
    ov = require_openvino()
    engine_path, bin_path = Path(engine_path), weights_path(engine_path)
    plain = bin_path.with_suffix(".xml")
    ov.save_model(model, str(plain), compress_to_fp16=False)
    with open(plain, "rb") as src, gzip.open(engine_path, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    plain.unlink()
    return [engine_path.name, bin_path.name]


def engine_bytes(engine_path: str | os.PathLike) -> int:
    return Path(engine_path).stat().st_size + weights_path(engine_path).stat().st_size


def read_engine(core, path: Path):
    """An OpenVINO model from ``NAME.xml.gz`` + ``NAME.bin``, or from anything ``read_model`` reads (ONNX, IR)."""
    if path.name.endswith(".xml.gz"):
        import openvino as ov

        with gzip.open(path, "rt", encoding="utf-8") as f:
            xml = f.read()
        return core.read_model(xml, ov.Tensor(np.fromfile(weights_path(path), np.uint8)))
    return core.read_model(str(path))


class OvRunner(Runner):
    """An OpenVINO IR (or ONNX) model on the CPU, compiled at its first call with each input shape (static
    shapes are OpenVINO's fast path; the sampler's batch is constant, so this compiles once, or twice when
    the last batch of a run is smaller)."""

    name = "openvino"

    def __init__(self, path: str | os.PathLike, threads: int | None = None, model=None,
                 float_precision: str | None = "f32"):
        """``model``: an ``openvino.Model`` already in memory (a peer's), named by ``path``. ``float_precision``:
        the engine's recorded one (``f32`` or ``bf16``; bf16 runs only where this CPU has it natively, see
        :func:`float_precision_here`)."""
        self.path = Path(path)
        self.core = shared_core()
        self.model = model if model is not None else read_engine(self.core, self.path)
        self.float_precision = float_precision_here(float_precision)
        self.config = dict(COMPILE_CONFIG, INFERENCE_PRECISION_HINT=self.float_precision)
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.input_names = [i.get_any_name() for i in self.model.inputs]
        self.input_shapes = {n: tuple(None if d.is_dynamic else d.get_length() for d in i.get_partial_shape())
                             for n, i in zip(self.input_names, self.model.inputs)}
        self._compiled: dict[tuple, object] = {}

    def compiled_for(self, feeds: dict):
        key = tuple((n, feeds[n].shape) for n in self.input_names)
        if key not in self._compiled:
            m = self.model.clone()
            m.reshape({n: list(feeds[n].shape) for n in self.input_names})
            self._compiled[key] = self.core.compile_model(m, "CPU", self.config)
        return self._compiled[key]

    def infer(self, x, t, context):
        feeds = unet_feeds(self.input_names, x, t, context, self.path.name)
        cm = self.compiled_for(feeds)
        return cm(feeds)[cm.output(0)]

    def executed_summary(self, feeds: dict, runs: int = 5) -> dict:
        """What the CPU plugin executed for ``feeds``' shapes (see :func:`executed_summary`), on a separately
        compiled copy with ``PERF_COUNT``, so the timed model stays unprofiled."""
        m = self.model.clone()
        m.reshape({n: list(feeds[n].shape) for n in self.input_names})
        cm = self.core.compile_model(m, "CPU", dict(self.config, PERF_COUNT=True))
        return executed_summary(cm, {n: feeds[n] for n in self.input_names}, runs)

    def close(self) -> None:
        self._compiled.clear()


COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")


def exec_precision(exec_type: str) -> str:
    """The precision an executed primitive ran in, from its implementation name (``brgconv_avx512_amx_I8`` ->
    int8, ``jit_avx512_f32`` -> f32, ``..._BF16`` -> bf16)."""
    tail = exec_type.rsplit("_", 1)[-1].lower()
    return {"i8": "int8", "u8": "int8", "fp32": "f32", "f32": "f32", "bf16": "bf16", "fp16": "f16", "f16": "f16",
            "i4": "int4", "u4": "int4"}.get(tail, tail or "?")


def executed_summary(compiled, feeds: dict, runs: int = 5) -> dict:
    """The executed graph of a model compiled with ``PERF_COUNT``, over ``runs`` inferences: how many convs and
    matmuls ran in int8 and in float, and where the time went (compute by precision, reorders, converts,
    the rest, each as a share of the executed layers' time). Layer times are OpenVINO's own per-layer
    counters (``get_profiling_info``), averaged over the runs."""
    req = compiled.create_infer_request()
    req.infer(feeds)  # warm-up
    totals: dict[str, float] = {}
    kinds: dict[str, tuple[str, str]] = {}
    for _ in range(runs):
        req.infer(feeds)
        for p in req.get_profiling_info():
            if str(p.status).endswith("EXECUTED") and not str(p.status).endswith("NOT_EXECUTED") \
                    and p.node_type not in ("Parameter", "Result", "Const", "Input", "Output"):
                totals[p.node_name] = totals.get(p.node_name, 0.0) + p.real_time.total_seconds() / runs
                kinds[p.node_name] = (str(p.node_type), str(p.exec_type))
    total = sum(totals.values()) or 1.0
    compute: dict[str, int] = {}
    share: dict[str, float] = {}
    counts = {"Reorder": 0, "Convert": 0, "FakeQuantize": 0}
    for name, sec in totals.items():
        layer, impl = kinds[name]
        if layer.startswith(COMPUTE_LAYERS):  # also e.g. FullyConnectedQuantizedLegacy (NNCF's int8 FCs)
            prec = exec_precision(impl)
            compute[prec] = compute.get(prec, 0) + 1
            key = f"{prec} compute"
        elif layer in counts:
            counts[layer] += 1
            key = layer.lower()
        else:
            key = "other"
        share[key] = share.get(key, 0.0) + sec / total
    return {"executed_layers": len(totals), "layer_ms": 1e3 * sum(totals.values()),
            "compute_layers": dict(sorted(compute.items())), "reorders": counts["Reorder"],
            "converts": counts["Convert"], "fake_quantize": counts["FakeQuantize"],
            "time_share": dict(sorted(share.items(), key=lambda kv: -kv[1]))}
