"""Latency measurement: engines timed round-robin in one process, medians after warm-up.

Each round runs every engine once, so drift on a noisy machine hits all of them alike; speed is
reported as a ratio to ONNX Runtime FP32 measured in the same rounds.
"""

from __future__ import annotations

import time

import numpy as np

from ptqd.bundle import Bundle, layout
from ptqd.engines.runner import round_robin, unet_feeds
from ptqd.facts import seeded_unet_inputs
from ptqd.runtime.loader import default_labels, open_decoder, open_engine, sampler_config, step_engines


def unet_latency(b, precisions, batch: int = 2, runs: int = 20, warmup: int = 3, threads: int | None = None,
                 runners: dict | None = None) -> dict[str, dict[str, float]]:
    """UNet forward latency (ms, median and min) per precision at ``batch`` (2 = one CFG-guided sample),
    with the median ratio to FP32. Spinning is off for every engine alike (several sessions take turns)."""

    names = ["fp32"] + [p for p in precisions if p != "fp32"]
    runners = dict(runners or {})
    for p in names:
        if p not in runners:
            runners[p] = open_engine(b, p, threads=threads, allow_spinning=False)
    feeds = seeded_unet_inputs(b.facts, batch, 501.0, 0)
    args = (feeds["x"], feeds["t"], feeds.get("context"))
    times = round_robin({p: (lambda r=runners[p]: r(*args)) for p in names}, runs, warmup)
    med = {p: float(np.median(v)) for p, v in times.items()}
    return {p: {"median_ms": 1e3 * med[p], "min_ms": 1e3 * float(np.min(times[p])),
                "speedup_vs_fp32": med["fp32"] / med[p]} for p in names}


class _Timed:
    """Wraps a runner and adds up the seconds spent inside it (to split engine time from the runtime's)."""

    def __init__(self, runner):
        self.runner, self.seconds, self.calls = runner, 0.0, 0

    def __call__(self, x, t, context=None):
        t0 = time.perf_counter()
        out = self.runner(x, t, context)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def peak_rss_mb(bundle, precisions: list[str], batch: int = 2) -> float:
    """Peak resident memory (MiB) of a fresh process that loads ``precisions`` (all at once, as the
    runtime keeps a plan's engines) and runs each once; [] measures the interpreter + ONNX Runtime alone.
    Read from VmHWM: a process's ru_maxrss survives exec, so it would report the (torch-laden) parent's."""
    import json
    import subprocess
    import sys

    code = ("import json,resource,sys;import numpy as np;import onnxruntime;from ptqd.runtime.loader import open_engine;"
            "from ptqd.bundle import Bundle;from ptqd.facts import seeded_unet_inputs;"
            "b=Bundle.open(sys.argv[1]);ps=json.loads(sys.argv[2]);"
            "rs=[open_engine(b,p,allow_spinning=False) for p in ps];"
            "f=seeded_unet_inputs(b.facts,int(sys.argv[3]),501.0,0);"
            "[r(f['x'],f['t'],f.get('context')) for r in rs];"
            "import pathlib;st=pathlib.Path('/proc/self/status');"
            "hwm=[l for l in st.read_text().splitlines() if l.startswith('VmHWM')] if st.exists() else [];"
            "print(int(hwm[0].split()[1])/1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    out = subprocess.run([sys.executable, "-c", code, str(bundle), json.dumps(list(precisions)), str(batch)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench(bundle, precisions=None, runs: int = 10, warmup: int = 3, large_batch: int = 32, e2e_images: int = 8,
          e2e_runs: int = 5,
          steps: int = 20, guidance: float = 3.0, threads: int | None = None, torch_peer: bool = True,
          memory: bool = True, progress=None, peers: bool = True, calib_items: int = 16) -> dict:
    """Latency, throughput, load time, memory and size per engine; end-to-end sampling per image with the
    runtime's own overhead. Every timing shares one process and runs round-robin (see module doc).

    Also timed, where present: the bundle's OpenVINO engines (``<precision>@openvino``, from ``ptqd build
    --backend openvino``) and, with ``peers``, OpenVINO FP32 and NNCF + OpenVINO INT8 (:mod:`ptqd.tools.peers`;
    a note says why one is missing)."""
    import os

    from ptqd.errors import PtqdError
    from ptqd.runtime.correction import StepEngines
    from ptqd.runtime.pipeline import decode, sample_latents
    from ptqd.stages.common import load_source
    from ptqd.stages.plan import plan_bops, precision_bops

    b = Bundle.open(bundle)
    facts = b.facts
    built = layout.built(b)
    precisions = list(precisions) if precisions else sorted(built, key=lambda p: (p != "ort-int8", p))
    table = b.read_json(layout.UNET_LAYERS) if b.has(layout.UNET_LAYERS) else None
    macs = table["macs_per_forward"] if table else None
    cfg_batch = 2 if facts.conditioning.guided and guidance != 1.0 else 1
    engines: dict = {}
    load_s: dict = {}
    sizes: dict = {}
    ov_built = layout.built(b, "openvino")
    ov_only = [p for p in precisions if p not in built and p in ov_built]  # e.g. nncf-int8, the OpenVINO peer
    precisions = [p for p in precisions if p not in ov_only]
    for p in ["fp32"] + precisions:
        t0 = time.perf_counter()
        engines[p] = open_engine(b, p, threads, allow_spinning=False)
        load_s[p] = time.perf_counter() - t0
        if p == "fp32":
            sizes[p] = os.path.getsize(b.path(layout.UNET_ONNX))
        else:
            sizes[p] = sum(e["size_bytes"] for e in built[p].get("buckets", [])) or built[p]["size_bytes"]
    notes = []
    for p in [p for p in precisions if p in ov_built] + ov_only:
        t0 = time.perf_counter()
        try:
            engines[f"{p}@openvino"] = open_engine(b, p, threads, backend="openvino")
        except PtqdError as e:  # e.g. the bundle moved to a machine without openvino
            notes.append(f"{p}@openvino skipped: {e}")
            continue
        load_s[f"{p}@openvino"] = time.perf_counter() - t0  # OpenVINO compiles at the first call, per batch size
        sizes[f"{p}@openvino"] = sum(e["size_bytes"] for e in ov_built[p]["buckets"])
        fpp = getattr(engines[f"{p}@openvino"], "float_precision", None)
        if fpp:
            notes.append(f"{p}@openvino: float parts in {fpp} (recorded {ov_built[p].get('float_precision', 'f32')}; "
                         "bf16 only where this CPU has it natively)")
    if peers:
        from ptqd.tools.peers import openvino_peers

        for k, (r, sec) in openvino_peers(b, threads, calib_items, notes).items():
            engines[k], load_s[k], sizes[k] = r, sec, None
    if torch_peer:
        try:
            from ptqd.engines.torch_ref import TorchRunner

            t0 = time.perf_counter()
            engines["torch-fp32"] = TorchRunner(load_source(b).unet)
            load_s["torch-fp32"] = time.perf_counter() - t0
            sizes["torch-fp32"] = None
        except (PtqdError, ImportError) as e:
            notes.append(f"PyTorch eager peer skipped: {e}")
    names = list(engines)
    latency: dict = {}
    for batch in (1, cfg_batch, large_batch) if cfg_batch != 1 else (1, large_batch):
        f = seeded_unet_inputs(facts, batch, 501.0, 0)
        if progress:
            progress(f"UNet forward, batch {batch}")
        for p in [p for p in names if "openvino" in p or p.startswith("ov-")]:  # compile for this batch
            try:
                engines[p](f["x"], f["t"], f.get("context"))
            except Exception as e:  # noqa: BLE001 - an optional engine or peer that cannot run is a note
                notes.append(f"{p} skipped at batch {batch}: {type(e).__name__}: {str(e)[:200]}")
                names.remove(p)
        times = round_robin({p: (lambda r=engines[p], f=f: r(f["x"], f["t"], f.get("context"))) for p in names},
                            runs if batch != large_batch else max(3, runs // 3), warmup if batch != large_batch else 1)
        for p in names:
            med = float(np.median(times[p]))
            latency.setdefault(p, {})[str(batch)] = {
                "median_ms": 1e3 * med, "min_ms": 1e3 * float(np.min(times[p])), "runs": len(times[p]),
                "samples_per_s": batch / med, "gflops": (2 * macs * batch / med / 1e9) if macs else None}
    for p in names:
        for k, v in latency[p].items():
            v["speedup_vs_ort_fp32"] = latency["fp32"][k]["median_ms"] / v["median_ms"]
    rows = {p: {"latency": latency[p], "load_s": load_s[p], "size_bytes": sizes[p]} for p in names}
    f1 = seeded_unet_inputs(facts, 1, 501.0, 0)
    for p in names:  # OpenVINO engines and peers: what the plugin executed, in which precision, where time went
        r = engines[p]
        r = r.pick(501.0) if hasattr(r, "pick") else r
        if hasattr(r, "executed_summary"):
            if progress:
                progress(f"executed graph of {p}")
            try:
                rows[p]["executed"] = r.executed_summary(unet_feeds(r.input_names, f1["x"], f1["t"], f1.get("context"),
                                                                    p))
            except Exception as e:  # noqa: BLE001 - a summary that cannot be taken is a note, not a failure
                notes.append(f"executed graph of {p} not taken: {type(e).__name__}: {str(e)[:200]}")
    fp_bops = precision_bops(b, "fp32") if table else None
    for p in names:
        if fp_bops and p.removesuffix("@openvino") in ["fp32"] + precisions + ov_only:
            rows[p]["bops_saving"] = fp_bops / precision_bops(b, p.removesuffix("@openvino"))
    if memory:
        if progress:
            progress("peak memory (a fresh process per engine)")
        base = peak_rss_mb(b.root, [], cfg_batch)
        for p in ["fp32"] + precisions:
            rows[p]["peak_rss_mb"] = peak_rss_mb(b.root, [p], cfg_batch)
        rows["_process_baseline_mb"] = base
    # end to end: sampling time per image, and the runtime's share (sampler arithmetic, guidance,
    # correction, engine switching: everything that is not an engine call or the decoder)
    decoder = open_decoder(b, threads)
    cls = layout.class_embedding(b)
    scfg = sampler_config(facts, steps, 0.0, guidance)
    labels = default_labels(facts, None, e2e_images)
    idx = np.arange(e2e_images)
    specs = ["fp32"] + [p for p in precisions if p != "ort-int8"] + (["auto"] if b.has(layout.PLAN_JSON) else []) + \
        (["ort-int8"] if "ort-int8" in precisions else [])
    e2e: dict = {}
    for spec in specs:
        if progress:
            progress(f"sampling {spec}")
        eng, label = step_engines(b, spec, "auto", cache=dict(engines))
        if isinstance(eng, StepEngines):
            timed = {p: _Timed(r) for p, r in eng.runners.items()}
            eng.runners = timed
            inner = list(timed.values())
        else:
            eng = _Timed(eng)
            inner = [eng]
        sample_latents(eng, facts, cls, labels, idx, 0, scfg)  # warm-up
        for t_ in inner:
            t_.seconds, t_.calls = 0.0, 0
        runs_ = []
        for _ in range(e2e_runs):
            for t_ in inner:
                t_.seconds, t_.calls = 0.0, 0
            if isinstance(eng, StepEngines):
                eng.reset_switches()  # count one run's switches
            t0 = time.perf_counter()
            lat = sample_latents(eng, facts, cls, labels, idx, 0, scfg)
            t_sample = time.perf_counter() - t0
            t1 = time.perf_counter()
            if decoder is not None:
                decode(decoder, lat, facts.scale_factor)
            t_dec = time.perf_counter() - t1
            runs_.append((t_sample + t_dec, t_sample, t_dec, sum(t_.seconds for t_ in inner)))
        total, t_sample, t_decode, engine_s = sorted(runs_)[len(runs_) // 2]  # the median run
        e2e[label] = {"seconds_per_image": total / e2e_images, "engine_share": engine_s / total,
                      "decoder_share": t_decode / total, "runtime_overhead_share": (t_sample - engine_s) / total,
                      "engine_calls": sum(t_.calls for t_ in inner),
                      "engine_switches": getattr(eng, "switches", 0),
                      "bops_saving": (fp_bops / plan_bops(b, spec, steps)) if fp_bops else None}
    for v in e2e.values():
        v["speedup_vs_ort_fp32"] = e2e["fp32"]["seconds_per_image"] / v["seconds_per_image"]
    out = {"bundle": str(b.root), "threads": threads or "onnxruntime default", "batches": {"single": 1, "cfg": cfg_batch,
                                                                                          "large": large_batch},
           "macs_per_forward": macs, "engines": rows, "sampling": e2e, "steps": steps, "e2e_images": e2e_images,
           "e2e_runs": e2e_runs,
           "notes": notes}
    if memory and b.has(layout.PLAN_JSON):
        plan_precs = sorted({s["precision"] for s in b.read_json(layout.PLAN_JSON)["steps"]})
        out["plan_resident"] = {"precisions": plan_precs, "peak_rss_mb": peak_rss_mb(b.root, plan_precs, cfg_batch)}
    return out
