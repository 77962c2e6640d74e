"""Optional CPU peers that a user might pick instead of ptqd, timed beside its engines: OpenVINO FP32 on
the exported graph, and NNCF's post-training quantization + OpenVINO INT8 (``pip install 'ptqd[peers]'``).
A peer that is not installed or cannot run becomes a note, never an error."""

from __future__ import annotations

import importlib.util
import time

import numpy as np

from ptqd.bundle import layout


def openvino_peers(b, threads: int | None, calib_items: int, notes: list[str]) -> dict:
    """{"ov-fp32": (runner, load seconds), "ov-nncf-int8" (NNCF's default recipe), "ov-nncf-mixed" (its mixed
    preset with the transformer model type) and "ov-nncf-hybrid" (optimum-intel's hybrid mode for diffusion
    models): (runner, seconds incl. NNCF's quantize())}, as far as what is installed allows; why a peer is
    missing goes to ``notes``."""
    if importlib.util.find_spec("openvino") is None:
        notes.append("OpenVINO peers skipped: openvino is not installed (pip install 'ptqd[peers]')")
        return {}
    import openvino as ov

    from ptqd.engines.openvino import OvRunner, openvino_default_precision

    fpp = openvino_default_precision()  # what a user of OpenVINO gets here: its float parts in bf16 where native
    notes.append(f"OpenVINO peers: float parts in {fpp} (OpenVINO's default on this CPU)")
    out = {}
    t0 = time.perf_counter()
    try:
        fp = ov.Core().read_model(str(b.path(layout.UNET_ONNX)))
        out["ov-fp32"] = (OvRunner(b.path(layout.UNET_ONNX), threads, model=fp, float_precision=fpp),
                          time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        notes.append(f"OpenVINO peers skipped: OpenVINO cannot read the exported graph: {type(e).__name__}: "
                     f"{str(e)[:200]}")
        return out
    if importlib.util.find_spec("nncf") is None:
        notes.append("NNCF + OpenVINO INT8 peer skipped: nncf is not installed (pip install 'ptqd[peers]')")
        return out
    try:
        import nncf  # noqa: F401 - checks it imports before the peers are timed
    except Exception as e:  # noqa: BLE001 - e.g. an nncf that does not match the installed openvino
        notes.append(f"NNCF + OpenVINO INT8 peer skipped: import nncf failed: {type(e).__name__}: {str(e)[:200]}")
        return out

    from ptqd.engines.openvino import NNCF_RECIPES, nncf_quantize

    feeds = dict(np.load(b.path(layout.CALIB_FEEDS)))
    items = min(calib_items, len(feeds["t"]))
    for recipe, what in NNCF_RECIPES.items():
        name = f"ov-{recipe}"
        t0 = time.perf_counter()
        try:
            q = nncf_quantize(fp, feeds, items, recipe)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            notes.append(f"NNCF + OpenVINO INT8 peer ({what}) failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        out[name] = (OvRunner(name, threads, model=q, float_precision=fpp), time.perf_counter() - t0)
        notes.append(f"{name}: NNCF quantize() ({what}) on {items} calibration inputs took "
                     f"{out[name][1]:.0f} s (its load time)")
    return out
