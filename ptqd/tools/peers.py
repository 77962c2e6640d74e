"""Optional CPU peers that a user might pick instead of ptqd, timed beside its engines: OpenVINO FP32 on
the exported graph, and NNCF's post-training quantization + OpenVINO INT8 (``pip install 'ptqd[peers]'``).
A peer that is not installed or cannot run becomes a note, never an error."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time

import numpy as np

from ptqd.bundle import layout


def openvino_peers(b, threads: int | None, calib_items: int, notes: list[str]) -> dict:
    """{"ov-fp32": (runner, load seconds), "ov-nncf-int8" (NNCF's default recipe) and "ov-nncf-mixed" (its mixed
    preset with the transformer model type): (runner, seconds incl. NNCF's quantize())}, as far as what is
    installed allows; why a peer is missing goes to ``notes``."""
    if importlib.util.find_spec("openvino") is None:
        notes.append("OpenVINO peers skipped: openvino is not installed (pip install 'ptqd[peers]')")
        return {}
    import openvino as ov

    from ptqd.engines.openvino import OvRunner

    out = {}
    t0 = time.perf_counter()
    try:
        fp = ov.Core().read_model(str(b.path(layout.UNET_ONNX)))
        out["ov-fp32"] = (OvRunner(b.path(layout.UNET_ONNX), threads, model=fp), time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        notes.append(f"OpenVINO peers skipped: OpenVINO cannot read the exported graph: {type(e).__name__}: "
                     f"{str(e)[:200]}")
        return out
    if importlib.util.find_spec("nncf") is None:
        notes.append("NNCF + OpenVINO INT8 peer skipped: nncf is not installed (pip install 'ptqd[peers]')")
        return out
    try:
        import nncf
    except Exception as e:  # noqa: BLE001 - e.g. an nncf that does not match the installed openvino
        notes.append(f"NNCF + OpenVINO INT8 peer skipped: import nncf failed: {type(e).__name__}: {str(e)[:200]}")
        return out

    data = np.load(b.path(layout.CALIB_FEEDS))
    names = [i.get_any_name() for i in fp.inputs]
    idx = np.linspace(0, len(data["t"]) - 1, min(calib_items, len(data["t"]))).round().astype(int)
    items = [{n: data[n][i:i + 1] for n in names} for i in idx]
    recipes = {"ov-nncf-int8": ("default recipe", {}),
               "ov-nncf-mixed": ("mixed preset, transformer model type",
                                 {"preset": nncf.QuantizationPreset.MIXED, "model_type": nncf.ModelType.TRANSFORMER})}
    for name, (what, kw) in recipes.items():
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout stays the command's (--json)
                q = nncf.quantize(fp, nncf.Dataset(items), subset_size=len(items), **kw)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            notes.append(f"NNCF + OpenVINO INT8 peer ({what}) failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        out[name] = (OvRunner(name, threads, model=q), time.perf_counter() - t0)
        notes.append(f"{name}: NNCF quantize() ({what}) on {len(items)} calibration inputs took "
                     f"{out[name][1]:.0f} s (its load time)")
    return out
