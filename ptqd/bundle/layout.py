"""Where everything lives in a bundle, and typed readers for it: the only module that spells a path.

```
manifest.json                       schema, model facts, files (sha256), stage records
unet.onnx(.data), unet.layers.json  FP32 export + layer table
first_stage.onnx                    decoder (when the model has one)
cond/class_embedding.npy            class-conditional models: the embedding table
cond/prompt_embeddings.npy          text-conditioned models: the calibration prompts encoded, row 0 = ""
cond/prompts.json                   ... and the prompts themselves
text_encoder.onnx, text/            text-conditioned models: the text encoder and its tokenizer
calib/feeds.npz                     the calibration's own UNet inputs (validation, peers)
calib/<precision>[.b<k>].json|npz   quantization parameters (per timestep bucket k when there are several)
calib/calibration.json              the calibration record
calib/correction.json               PTQD's fitted correction
calib/plan.json                     the step-aware mixed-precision plan
engines/<backend>/...               engines + build.json
eval/                               the demo's evaluator (digit classifier and real digits)
reports/                            validation, eval, bench, check results
```
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ptqd.precision import CALIBRATED_NAMES

UNET_ONNX = "unet.onnx"
UNET_LAYERS = "unet.layers.json"
FIRST_STAGE_ONNX = "first_stage.onnx"
CLASS_EMBEDDING = "cond/class_embedding.npy"
PROMPT_TABLE = "cond/prompt_embeddings.npy"
PROMPTS_JSON = "cond/prompts.json"
TEXT_ENCODER_ONNX = "text_encoder.onnx"
TOKENIZER_JSON = "text/tokenizer.json"
TOKENIZER_CONFIG = "text/tokenizer_config.json"
TOKENIZER_2_JSON = "text/tokenizer_2.json"  # SDXL: the second text encoder's tokenizer
TOKENIZER_2_CONFIG = "text/tokenizer_2_config.json"
EXPORT_REPORT = "reports/export_validation.json"
OUTLIERS_JSON = "outliers.json"  # `--outliers`: the body layers' smoothing and low-rank branches (calib/outliers.py)
OUTLIERS_NPZ = "outliers.npz"
CALIB_FEEDS = "calib/feeds.npz"
CALIBRATION_JSON = "calib/calibration.json"
CORRECTION_JSON = "calib/correction.json"
PLAN_JSON = "calib/plan.json"
ORT_DIR = "engines/onnxruntime"
BUILD_JSON = f"{ORT_DIR}/build.json"
TRT_DIR = "engines/tensorrt"
TRT_BUILD_JSON = f"{TRT_DIR}/build.json"
OV_DIR = "engines/openvino"
OV_BUILD_JSON = f"{OV_DIR}/build.json"
DEMO_FEATURES = "eval/features.onnx"
DEMO_REAL = "eval/real_images.npz"
BENCH_JSON = "reports/bench.json"
CHECK_BASELINE = "reports/check_baseline.json"

# What a stage consumed (prefixes of bundle paths): their sha256 make a finished stage reusable.
CALIB_FILES = tuple(f"calib/{p}." for p in CALIBRATED_NAMES)
BUILD_INPUTS = CALIB_FILES + (CALIB_FEEDS, UNET_ONNX)
PLAN_INPUTS = (CORRECTION_JSON, BUILD_JSON)


def bucket_suffix(k: int, buckets: int) -> str:
    """File-name suffix of timestep bucket k: none with a single bucket, ``.b<k>`` otherwise."""
    return "" if buckets == 1 else f".b{k}"


def calib_params(precision: str, k: int = 0, buckets: int = 1) -> tuple[str, str]:
    """(json, npz) paths of one precision's quantization parameters for timestep bucket k."""
    stem = f"calib/{precision}{bucket_suffix(k, buckets)}"
    return f"{stem}.json", f"{stem}.npz"


def ort_engine(precision: str, k: int = 0, buckets: int = 1) -> tuple[str, str]:
    """(QDQ graph, engine) paths of one ONNX Runtime engine."""
    stem = f"{ORT_DIR}/{precision}{bucket_suffix(k, buckets)}"
    return f"{stem}.qdq.onnx", f"{stem}.onnx"


def ov_engine(precision: str, k: int = 0, buckets: int = 1) -> tuple[str, str]:
    """(topology ``.xml.gz``, weights ``.bin``) of one OpenVINO engine (IR)."""
    stem = f"{OV_DIR}/{precision}{bucket_suffix(k, buckets)}"
    return f"{stem}.xml.gz", f"{stem}.bin"


def report(name: str) -> str:
    return f"reports/{name}.json"


def build_json(backend: str) -> str:
    return {"tensorrt": TRT_BUILD_JSON, "openvino": OV_BUILD_JSON}.get(str(backend), BUILD_JSON)


# ---- typed readers ---------------------------------------------------------------------------------
def read_json_or(b, rel: str, default: Any) -> Any:
    return b.read_json(rel) if b.has(rel) else default


def class_embedding(b) -> np.ndarray | None:
    """The conditioning table that labels index: a class-conditional model's class embeddings
    ([classes, D]), or a text-conditioned model's encoded prompts ([1 + prompts, tokens, D], row 0 the
    negative prompt); None for an unconditional model."""
    for rel in (CLASS_EMBEDDING, PROMPT_TABLE):
        if b.has(rel):
            return np.load(b.path(rel))
    return None


def layer_rows(b) -> list[dict]:
    return b.read_json(UNET_LAYERS)["layers"]


BACKEND_CHOICE = "engines/backend.json"  # `--backend auto`: the backend timed fastest for this bundle, and where


def built(b, backend: str = "onnxruntime") -> dict[str, Any]:
    """The build record (precision -> record) of a backend; empty when nothing was built."""
    return read_json_or(b, build_json(backend), {})


def calib_buckets(b) -> list[dict]:
    """The calibration's timestep buckets (one covering every t when it has none)."""
    return (b.stage("calibrate") or {}).get("buckets") or [
        {"t_range": [0, b.facts.schedule.num_train_timesteps - 1]}]


def calibrated_precisions(b) -> list[str]:
    return [p for p in CALIBRATED_NAMES if b.has(calib_params(p)[0]) or b.has(calib_params(p, 0, 2)[0])]


def calib_layer_meta(b, precision: str) -> list[dict] | None:
    """The first bucket's layer records of a calibrated precision (None when it is not calibrated)."""
    for rel in (calib_params(precision)[0], calib_params(precision, 0, 2)[0]):
        if b.has(rel):
            return b.read_json(rel)["layers"]
    return None


def npz_bytes(arrays: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    """An .npz file's bytes (what ``BundleWriter.write_bytes`` takes)."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()
