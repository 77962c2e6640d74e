"""``ptqd build``: one engine per precision (and timestep bucket) from the calibration, each validated
against its fake-quant model, plus ONNX Runtime's own quantizer as the peer. ``--backend tensorrt``
goes to :mod:`ptqd.stages.build_tensorrt`, ``--backend openvino`` to :mod:`ptqd.stages.build_openvino`."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.engines.compare import Memo, validate_quantized, validation_inputs
from ptqd.errors import UserError, ValidationError
from ptqd.precision import CALIBRATED, ORT_BUILDABLE, PEER, Backend, Precision
from ptqd.progress import progress_bar
from ptqd.resources import cpu_description
from ptqd.stages.common import (
    buildable_here,
    calib_attention,
    calib_layers,
    commit_build,
    load_source,
    require_calibrated,
)


def numerics(p: Precision, portable: bool = True, attention: int = 0) -> str:
    """What an ONNX Runtime engine of precision ``p`` computes, in words (recorded in build.json)."""
    if p == PEER:
        return ("ONNX Runtime quantize_static: QDQ, U8 activations (MinMax), S8 per-channel weights, reduce_range; "
                "attention matmuls float")
    return (f"w{p.w_bits}a{p.a_bits} numerics on int8 kernels (QLinearConv, MatMulIntegerToFloat)"
            + (": weights on the 4-bit grid, stored two per byte (expanded at load)" if p.w_bits == 4 else
               (": 8-bit weights on the reduce-range grid ±63 (exact on AVX2 u8s8)" if portable else
                ": 8-bit weights on the full grid ±127 (exact with VNNI or AMX only)"))
            + (", activations clipped to the 4-bit grid" if p.a_bits == 4 else "")
            + "; conv outputs requantized to 8 bits; first/last layers and embedding Gemms 8-bit; skip and "
              "downsample convs " + ("float" if p == Precision.W8A8 else "8-bit") + "; "
            + (f"{attention} attention matmuls on 8-bit inputs (MatMulIntegerToFloat), the rest float" if attention
               else "attention matmuls float (one MultiHeadAttention kernel where the graph's attention has the "
                    "standard layout)"))


def validate_built(fp_ref, eng_path, loaded, layers, inputs: list[dict], act_bits: int, attention=()) -> dict:
    """The engine at ``eng_path`` vs its fake-quant model end to end, and every integer kernel on its
    own inputs (see :func:`ptqd.engines.compare.validate_quantized`). ``fp_ref``: FP32 on the validation
    inputs (a :class:`ptqd.engines.compare.Memo` shared by the build's precisions), read only for a
    rounding cascade's verdict."""
    from ptqd.calib.fakequant import fake_quant_model
    from ptqd.engines.kernels import check_kernels
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.engines.torch_ref import TorchRunner

    ref = TorchRunner(fake_quant_model(loaded.unet, layers, attention))
    kernels = check_kernels(eng_path, layers, inputs[len(inputs) // 2], attention)
    return validate_quantized(OrtRunner(eng_path), ref, lambda: fp_ref, kernels, inputs, act_bits)


def plan_precisions(b: Bundle, precisions: tuple[Precision, ...], log) -> tuple[tuple[Precision, ...], int]:
    """Check the build fits in memory before it starts (:mod:`ptqd.memory`): refuse in one line when one
    of ptqd's engines will not fit; run ONNX Runtime's quantize_static peer on as many calibration items at
    once as fit, and leave it out (one line through ``log``) when even one does not. Returns the precisions
    to build and the peer's items per run."""
    from ptqd import memory
    from ptqd.resources import available_bytes

    m = memory.ModelCost.from_bundle(b)
    if any(p != PEER for p in precisions):
        memory.require("build", *memory.stage_need("build", m, None))
    chunk = 0
    if PEER in precisions:
        chunk = memory.peer_chunk(m)
        if chunk is None:
            need = memory.peer_peak(m, 1)
            if precisions == (PEER,):
                memory.require("build of ort-int8 (ONNX Runtime's quantize_static)", need,
                               "leave this reference engine out, or build it on a machine with more")
            have, where = available_bytes()
            log(f"ptqd: note: ort-int8 (ONNX Runtime's quantize_static, a reference) left out: it needs about "
                f"{memory.gb(need)} and {memory.gb(have)} is available ({where}); build it later with "
                f"`ptqd build {b.root} --precisions ort-int8` on a machine with more")
            precisions = tuple(p for p in precisions if p != PEER)
    return precisions, chunk


@writes_bundle()
def build_auto(bundle, precisions=None, validate: bool = True, progress: bool | None = None, log=None,
               float_precision: str = "auto", act_grid: str = "auto") -> dict:
    """``--backend auto``: ONNX Runtime's engines, OpenVINO's where openvino is installed, then the faster of the
    two for this bundle on this machine (``ptqd.stages.choose``). Returns {"onnxruntime": records,
    "openvino": records, "choice": the record}."""
    import importlib.util
    import sys

    from ptqd.stages.choose import choose_backend

    say = log or (lambda msg: print(msg, file=sys.stderr))
    out = {"onnxruntime": build(bundle, "onnxruntime", precisions, validate, progress, log)}
    if importlib.util.find_spec("openvino") is not None:
        ov = None if precisions is None else tuple(p for p in precisions if str(p) != str(PEER))
        out["openvino"] = build(bundle, "openvino", ov, validate, progress, log, float_precision, act_grid)
    else:
        say("backend auto: openvino is not installed, so only ONNX Runtime is a candidate (pip install openvino)")
    out["choice"] = choose_backend(bundle, log=say)
    return out


def build(bundle, backend: str = "onnxruntime", precisions=None, validate: bool = True,
          progress: bool | None = None, log=None, float_precision: str = "auto", act_grid: str = "auto") -> dict:
    """One engine per precision from the calibration; validated against the fake-quant model. Each
    precision is committed as soon as it is built and validated, so an interrupted build keeps the
    engines it finished (``ptqd compile`` then builds only the rest)."""
    import sys

    from ptqd.engines import graph_opt
    from ptqd.engines.onnxruntime import (
        OrtRunner,
        build_engine,
        describe_engine,
        pack_4bit_weights,
        quantize_static_peer,
    )
    from ptqd.engines.qdq import write_qdq

    if str(backend) == "auto":
        return build_auto(bundle, precisions, validate, progress, log, float_precision, act_grid)
    if Backend.parse(backend) == Backend.TENSORRT:
        from ptqd.stages.build_tensorrt import build_tensorrt

        return build_tensorrt(bundle, None if precisions is None else tuple(precisions), validate, progress)
    if Backend.parse(backend) == Backend.OPENVINO:
        from ptqd.stages.build_openvino import build_openvino

        return build_openvino(bundle, None if precisions is None else tuple(precisions), validate, progress,
                              float_precision, act_grid)
    precisions = ORT_BUILDABLE if precisions is None else tuple(precisions)
    bad = [p for p in precisions if p not in [str(q) for q in ORT_BUILDABLE]]
    if bad:
        raise UserError(f"unknown precision(s) {bad}; choose from {', '.join(map(str, ORT_BUILDABLE))}")
    precisions = tuple(Precision(p) for p in precisions)
    b = Bundle.open(bundle)
    require_calibrated(b)
    requires = buildable_here(b) if any(p != PEER for p in precisions) else {}
    precisions, chunk = plan_precisions(b, precisions, log or (lambda msg: print(msg, file=sys.stderr)))
    # the peer first, before the torch model for the validation is loaded: their peaks do not add up
    precisions = tuple(sorted(precisions, key=lambda p: p != PEER))
    rows = layout.layer_rows(b)
    if any(p != PEER for p in precisions):
        graph_opt.prepare(b.path(layout.UNET_ONNX))
    loaded = None
    # FP32's outputs on the validation inputs, computed at most once per build for every cascade verdict
    fp_ref = Memo(lambda: OrtRunner(b.path(layout.UNET_ONNX)))
    feeds = dict(np.load(b.path(layout.CALIB_FEEDS))) if validate or PEER in precisions else None
    val_inputs = validation_inputs(feeds) if validate else None
    records: dict[str, Any] = {}
    calib_buckets = layout.calib_buckets(b)
    with progress_bar(len(precisions), "build", progress) as bar:
        for p in precisions:
            t0 = time.perf_counter()
            bar.set_postfix_str(p.value)
            with Bundle.transaction(b.root) as w:  # one commit per precision: a kill loses only the one in work
                old = layout.built(Bundle.open(b.root))
                for rel in w.listed(f"{layout.ORT_DIR}/{p.value}."):
                    w.remove(rel)  # a rebuild replaces every bucket's engine of this precision
                rec: dict[str, Any] = {"numerics": numerics(p, not requires), "built_on": cpu_description()}
                if requires and p != PEER:
                    rec["requires"] = requires
                buckets = calib_buckets if p in CALIBRATED else [None]
                rec["buckets"] = []
                for k, bucket in enumerate(buckets):
                    qdq_rel, eng_rel = layout.ort_engine(p.value, k, len(buckets))
                    qdq_path, eng_path = w.file(qdq_rel), w.file(eng_rel)
                    layers = None
                    if p == PEER:
                        attention = [r["name"] for r in rows if r["kind"] == "attention"]
                        quantize_static_peer(b.path(layout.UNET_ONNX), qdq_path, feeds, attention, chunk=chunk)
                        rec["calibration_items_per_run"] = chunk
                    else:
                        layers = calib_layers(b, p.value, k, len(buckets))
                        attention = calib_attention(b, p.value, k, len(buckets))
                        fp = b.path(layout.UNET_ONNX)
                        wrote = write_qdq(fp, layers, qdq_path, attention=attention, low_bits_clip="int",
                                          rewrite=lambda m, fp=fp: graph_opt.optimize_for_ort(m, fp))
                        if k == 0:
                            rec["graph_rewrites"] = wrote["graph"]
                            rec["numerics"] = numerics(p, not requires, len(attention))
                    build_engine(qdq_path, eng_path)
                    packed = pack_4bit_weights(eng_path, layers) if layers and p.w_bits == 4 else {}
                    for rel in (qdq_rel, eng_rel):  # external data beside a graph over 1 GiB
                        if (w.staging / f"{rel}.data").is_file():
                            w.declare(f"{rel}.data")
                    pruned = set((wrote["graph"] or {}).get("pruned_layers", ())) if layers is not None else set()
                    desc = describe_engine(eng_path, [r for r in rows if r["name"] not in pruned])
                    if k == 0:
                        rec.update(desc, **packed)
                    entry = {"t_range": bucket["t_range"] if bucket else None,
                             "engine": eng_path.relative_to(w.staging).as_posix(), "size_bytes": desc["size_bytes"]}
                    if validate and layers is not None:
                        if loaded is None:
                            loaded = load_source(b)
                        val = validate_built(fp_ref, eng_path, loaded, layers, val_inputs, p.a_bits, attention)
                        fp_ref.release()  # its outputs stay; the session is not held while the next engine builds
                        entry["validation_vs_fake_quant"] = val
                        if k == 0:
                            rec["validation_vs_fake_quant"] = val
                        if not val["passed"]:
                            raise ValidationError("engine vs fake-quant model",
                                                  f"{p.value}{layout.bucket_suffix(k, len(buckets))}: {val['failure']}")
                    rec["buckets"].append(entry)
                rec["build_seconds"] = round(time.perf_counter() - t0, 1)
                records[p.value] = rec
                commit_build(w, b, "onnxruntime", "build", old, {p.value: rec})
            bar.update()
    return records
