"""``ptqd export``: a model source -> a new bundle with the FP32 UNet ONNX, its layer table and the decoder,
each validated against torch. The bundle at ``out`` is replaced only if every step succeeds."""

from __future__ import annotations

import io
import os
from typing import Any

from ptqd.bundle import Bundle, layout, writes_bundle
from ptqd.errors import UserError
from ptqd.facts import NoiseSchedule
from ptqd.progress import progress_bar
from ptqd.stages.common import source_digest


def parse_schedule(spec: str) -> NoiseSchedule:
    """``KIND:BETA_START:BETA_END:T`` (e.g. ``scaled_linear:0.0015:0.0195:1000``) -> NoiseSchedule."""
    try:
        kind, start, end, T = spec.split(":")
        return NoiseSchedule(kind, int(T), float(start), float(end))
    except ValueError as e:
        raise UserError(f"--schedule {spec!r}: expected KIND:BETA_START:BETA_END:T with KIND linear or "
                        f"scaled_linear, e.g. scaled_linear:0.0015:0.0195:1000 ({e})") from None


@writes_bundle("out", create=True)
def export(model: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | dict | None = None,
           schedule: NoiseSchedule | None = None, first_stage: bool = True, validate: bool = True,
           opset: int = 18, exporter: str = "torchscript", progress: bool | None = None,
           prompts: list[str] | str | os.PathLike | None = None, outliers: str = "none",
           rank_budget: float = 0.05, outlier_layers: float = 1.0) -> dict[str, Any]:
    """Export ``model`` to a new bundle at ``out``: FP32 UNet ONNX + layer table (+ decoder).

    Text-to-image pipelines also get the text encoder (ONNX), the tokenizer (a ``tokenizers`` file) and
    the calibration ``prompts`` (a list or a file, one a line; default ``ptqd.models.text.DEFAULT_PROMPTS``)
    encoded as the table later stages index like classes, row 0 the negative prompt "".

    ``outliers`` (``calib.outliers``): smooth | lowrank | svd rewrites the 4-bit layers before export (activation
    outliers moved into the weights; a low-rank branch of at most ``rank_budget`` of a layer's MACs), fitted on
    FP trajectories of the model, on the ``outlier_layers`` share of the 4-bit layers where it helps most;
    everything after export sees ordinary layers.

    The bundle at ``out`` is replaced only if every step, validation included, succeeds.
    Returns the export record written to the manifest.
    """
    import numpy as np

    from ptqd.exporter import ExportConfig, export_first_stage, export_unet, validate_first_stage, validate_unet
    from ptqd.exporter.layers import build_layer_table
    from ptqd.exporter.onnx_export import LARGE, param_bytes
    from ptqd.exporter.validate import LARGE_VALIDATION, ValidationConfig
    from ptqd.facts import seeded_unet_inputs
    from ptqd.models import load_model

    from ptqd.calib.outliers import check_mode

    check_mode(outliers, rank_budget, outlier_layers)
    ecfg = ExportConfig(opset=opset, exporter=exporter)
    try:
        ecfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    steps = 3 + int(validate) + 2 * int(first_stage)
    with progress_bar(steps, "export", progress) as bar:
        bar.set_postfix_str("loading model")
        loaded = load_model(model, config=config, schedule=schedule, with_first_stage=first_stage)
        bar.update()
        record: dict[str, Any] = {"source": str(model), "source_sha256": source_digest(model), "opset": opset,
                                  "exporter": exporter, "inputs": ["x", "t"]}
        prompt_list = bind_prompts(loaded, prompts)
        if prompt_list is not None:
            record["prompts"] = prompt_list
        elif prompts is not None:
            raise UserError(f"--prompts: {model} is not a text-to-image model (its conditioning is "
                            f"{loaded.facts.conditioning.kind}); drop --prompts")
        with Bundle.transaction(out, create=True) as w:
            reports: dict[str, Any] = {}
            if outliers != "none":
                bar.set_postfix_str(f"fitting the {outliers} rewrite on FP trajectories")
                record["outliers"] = rewrite_outliers(w, loaded, outliers, rank_budget, bar.set_postfix_str,
                                                       outlier_layers)
            bar.set_postfix_str("exporting UNet")
            path = w.file(layout.UNET_ONNX)
            for extra in export_unet(loaded, path, ecfg)[1:]:
                w.declare(extra.name)
            bar.update()
            if loaded.class_embedding is not None:
                buf = io.BytesIO()
                np.save(buf, loaded.class_embedding.astype(np.float32))
                w.write_bytes(layout.PROMPT_TABLE if prompt_list is not None else layout.CLASS_EMBEDDING,
                              buf.getvalue())
                record["inputs"].append("context")
            if prompt_list is not None:
                bar.set_postfix_str("exporting the text encoder")
                reports.update(write_text_side(w, loaded, prompt_list, ecfg, validate))
            if validate:
                bar.set_postfix_str("validating UNet vs torch")
                large = param_bytes(loaded.unet) > LARGE  # checked at fewer points, torch's weights freed first
                reports["unet"] = validate_unet(loaded, path, LARGE_VALIDATION if large else ValidationConfig(),
                                                class_rows=loaded.class_embedding, release=large)
                bar.update()
            bar.set_postfix_str("layer table")
            feeds = seeded_unet_inputs(loaded.facts, 1, 500.0, 0)
            w.write_json(layout.UNET_LAYERS, build_layer_table(path, feeds))
            bar.update()
            if first_stage and loaded.first_stage is not None:
                bar.set_postfix_str("exporting decoder")
                fpath = w.file(layout.FIRST_STAGE_ONNX)
                for extra in export_first_stage(loaded, fpath, ecfg)[1:]:
                    w.declare(extra.name)
                bar.update()
                if validate:
                    bar.set_postfix_str("validating decoder")
                    reports["first_stage"] = validate_first_stage(loaded, fpath)
                bar.update()
            elif first_stage:
                bar.update(2)
            record["first_stage"] = first_stage and loaded.first_stage is not None
            record["validation"] = {k: {"worst_abs_error": v["worst_abs_error"], "passed": v["passed"]}
                                    for k, v in reports.items()}
            if reports:
                w.write_json(layout.EXPORT_REPORT, reports)
            if loaded.facts.family == "demo":
                write_demo_eval_assets(w)
            w.set_model(loaded.facts.to_json())
            w.set_stage("export", record)
        bar.set_postfix_str("done")
    return record


def rewrite_outliers(w, loaded, mode: str, rank_budget: float, status=None, layer_share: float = 1.0) -> dict[str, Any]:
    """Fit and apply ``calib.outliers``' rewrite to ``loaded``; its parameters go into the bundle (``load_source``
    applies them again). Returns the export record's summary."""
    import time

    import numpy as np

    from ptqd.calib import outliers as ol

    t0 = time.perf_counter()
    rewrites = ol.fit(loaded, mode, rank_budget, status=status, layer_share=layer_share)
    ol.apply(loaded, rewrites)
    meta, arrays = ol.save(rewrites)
    w.write_json(layout.OUTLIERS_JSON, {"mode": mode, "rank_budget": rank_budget, "layer_share": layer_share, **meta})
    w.write_bytes(layout.OUTLIERS_NPZ, layout.npz_bytes(arrays))
    errs = {k: float(np.mean([rw.errors[k] for rw in rewrites])) if rewrites else 0.0 for k in ("before", "after")}
    return {"mode": mode, "rank_budget": rank_budget, "layer_share": layer_share, "layers": len(rewrites),
            "smoothed": sum(rw.alpha is not None for rw in rewrites),
            "branch_ranks": sum(rw.rank for rw in rewrites), "w4a4_layer_rel_error": errs,
            "seconds": round(time.perf_counter() - t0, 1)}


def write_demo_eval_assets(w) -> None:
    """The demo's evaluator travels in its bundle: digit classifier (features) and the real digits."""
    from ptqd.models.demo import demo_dir, digits
    from ptqd.runtime.pipeline import to_uint8

    w.write_bytes(layout.DEMO_FEATURES, (demo_dir() / "digit_classifier.onnx").read_bytes())
    xtr, ytr, xte, yte = digits()
    w.write_bytes(layout.DEMO_REAL, layout.npz_bytes({"train_images": to_uint8(xtr), "train_labels": ytr,
                                                      "held_out_images": to_uint8(xte), "held_out_labels": yte},
                                                     compressed=True))


def bind_prompts(loaded, prompts) -> list[str] | None:
    """Text models: encode the calibration prompts into ``loaded.class_embedding`` (row 0: "") and bind
    the facts to them. Returns the prompt list (None for models without text conditioning)."""
    import dataclasses

    from ptqd.models.text import DEFAULT_PROMPTS, encode_prompts
    from ptqd.runtime.text import read_prompts

    cond = loaded.facts.conditioning
    if cond.kind != "text":
        return None
    if prompts is None:
        prompt_list = list(DEFAULT_PROMPTS)
    elif isinstance(prompts, (str, os.PathLike)):
        prompt_list = read_prompts(prompts)
    else:
        prompt_list = [str(p) for p in prompts]
    if not prompt_list:
        raise UserError("--prompts: give at least one calibration prompt")
    loaded.class_embedding = encode_prompts(loaded, [""] + prompt_list)
    loaded.facts = dataclasses.replace(loaded.facts, conditioning=cond.with_prompts(len(prompt_list)))
    return prompt_list


def write_text_side(w, loaded, prompt_list: list[str], ecfg, validate: bool) -> dict[str, Any]:
    """The text encoder (validated vs torch), the tokenizer for the runtime, and the prompts."""
    from ptqd.exporter import export_text_encoder, validate_text_encoder
    from ptqd.models.text import tokenizer_files

    path = w.file(layout.TEXT_ENCODER_ONNX)
    for extra in export_text_encoder(loaded, path, ecfg)[1:]:
        w.declare(extra.name)
    slot = getattr(loaded.text_encoder, "time_ids_record", lambda: None)()
    text, settings = tokenizer_files(loaded.tokenizer, loaded.zero_empty_prompt, slot)
    w.write_bytes(layout.TOKENIZER_JSON, text.encode())
    w.write_json(layout.TOKENIZER_CONFIG, settings)
    if loaded.tokenizer_2 is not None:  # SDXL's second encoder
        text, settings = tokenizer_files(loaded.tokenizer_2, loaded.zero_empty_prompt)
        w.write_bytes(layout.TOKENIZER_2_JSON, text.encode())
        w.write_json(layout.TOKENIZER_2_CONFIG, settings)
    w.write_json(layout.PROMPTS_JSON, {"negative": "", "prompts": prompt_list})
    return {"text_encoder": validate_text_encoder(loaded, path, [""] + prompt_list)} if validate else {}

