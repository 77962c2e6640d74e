"""Engine speed, size, load time and memory where they are real: cin256-v2-family UNets at mid (47 M
parameters, 32x32 latent) and full size (400.9 M, 64x64), ptqd's engines beside every CPU peer.

    python benchmarks/speed_at_size.py --size mid  [--work DIR] [--runs 12] [--threads 2] [--batches 1,2]
    python benchmarks/speed_at_size.py --size full [--work DIR] [--no-torch]

Builds (or reuses, in ``DIR``) a seeded random-weight checkpoint, its bundle, a FAST calibration
(``--rounding nearest``, ``--samples 1``, ``--steps 4``: speed does not depend on weight values; the
quality of a compile is the demo's and scale.py's business) and the engines w8a8, w4a8, w4a4 and
ort-int8 (ONNX Runtime's ``quantize_static``). Then, in ONE process, per batch size, interleaved
rounds (each round runs every engine once, starting one engine later than the round before), the median of
``--runs`` after ``--warmup``:

  ort-fp32       the exported FP32 ONNX in a plain ONNX Runtime session (what a user gets)
  w8a8 ...       ptqd's engines through the runtime's own runner (4-bit engines: packed weights)
  w8a8-openvino  the same calibration on ptqd's OpenVINO backend (`ptqd build --backend openvino`: its QDQ
                 graph with conv outputs in float, as OpenVINO IR, 4-bit weights as i4; where openvino is installed)
  ort-int8       ONNX Runtime quantize_static (QDQ, U8/S8 per channel, reduce_range)
  torch-fp32     PyTorch eager (``--no-torch`` skips it)
  ov-fp32        OpenVINO on the same FP32 ONNX (optional: pip install ptqd[peers])
  ov-nncf-int8   NNCF quantize() (default recipe) + OpenVINO                          (optional, same)
  ov-nncf-mixed  NNCF quantize() (mixed preset, transformer model type) + OpenVINO    (optional, same)
  ov-nncf-hybrid optimum-intel's hybrid mode: linear layers weight-only int8, the rest  (optional, same)
                 NNCF mixed preset + transformer model type, SmoothQuant off

Every OpenVINO model runs in the float precision it gets: ptqd's engines their recorded one (``ptqd build
--float-precision``: bf16 where the CPU computes it natively and the engine stays as close to FP32), the peers
OpenVINO's own default on this CPU (bf16 where native: what their users get). ``--f32-rows`` adds each OpenVINO
model again as ``NAME@f32``, its float parts forced to f32, in the same interleaved rounds.

Every session runs ``--threads`` intra-op threads with spinning off (they take turns; MEASURED.md).
Per engine: file size (external data included), load seconds (opening it and its first forward at the
first batch size, where OpenVINO compiles), peak resident MiB of a fresh process that loads it and runs one
forward. Prints a table and writes ``DIR/speed_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ptqd.engines.runner import round_robin

OURS = ("w8a8", "w4a8", "w4a4")
PEER = "ort-int8"
OV = "-openvino"  # ptqd's engines on the OpenVINO backend: "w8a8-openvino"


def prepare(work: Path, size: str, samples: int, steps: int, rounding: str, validate: bool, log=print,
            openvino: bool = True) -> Path:
    """Checkpoint -> bundle -> fast calibration -> engines (ONNX Runtime; OpenVINO too where it is installed),
    each step skipped when already done."""
    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.models.tiny import write_cin256_family

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"cin256_{size}.safetensors"
    if not ckpt.exists():
        write_cin256_family(ckpt, size)
    out = work / f"{size}.bundle"
    t0 = time.perf_counter()
    if not (out / "manifest.json").exists():
        api.export(str(ckpt), out, first_stage=False, progress=False)
        log(f"export: {time.perf_counter() - t0:.0f} s")
    b = Bundle.open(out)
    cal = b.stage("calibrate")
    want = {"samples": samples, "steps": steps, "rounding": rounding}
    if cal is None or any(cal["config"].get(k) != v for k, v in want.items()):
        t0 = time.perf_counter()
        api.calibrate(out, samples=samples, steps=steps, rounding=rounding, progress=False)
        log(f"calibrate (fast: {rounding} rounding, {samples} trajectory, {steps} steps): "
            f"{time.perf_counter() - t0:.0f} s")
        b = Bundle.open(out)
    built = b.read_json(api.BUILD_JSON) if b.has(api.BUILD_JSON) else {}
    if b.stage("build") is None or set(built) != set(OURS + (PEER,)) or \
            b.stage("build").get("inputs") != _build_inputs(b):
        t0 = time.perf_counter()
        api.build(out, precisions=OURS + (PEER,), validate=validate, progress=False)
        log(f"build: {time.perf_counter() - t0:.0f} s")
    if openvino and _has_openvino():
        b = Bundle.open(out)
        st = b.stage("build_openvino")
        ov = b.read_json("engines/openvino/build.json") if b.has("engines/openvino/build.json") else {}
        stale = any(not e["engine"].endswith(".xml.gz") for r in ov.values() for e in r["buckets"]) or any(
            r.get("conv_outputs") != "float" for r in ov.values()) or any(  # before OpenVINO's own layout
            "float_precision" not in ov[p] for p in OURS if p in ov)  # or before the bf16 float parts
        if st is None or stale or set(st["precisions"]) != set(OURS) or st.get("inputs") != _build_inputs(b):
            t0 = time.perf_counter()
            api.build(out, backend="openvino", precisions=OURS, validate=validate, progress=False)
            log(f"build --backend openvino: {time.perf_counter() - t0:.0f} s")
    return out


def onnx_bytes(path: Path) -> int:
    """An ONNX file's bytes plus its external data files (quantize_static's engine at full size keeps its
    weights in the QDQ graph's ``.data`` file)."""
    import onnx

    from ptqd.engines.onnxruntime import external_data_files

    graph = onnx.load(str(path), load_external_data=False).graph
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in external_data_files(graph))


def _has_openvino() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _build_inputs(b):
    from ptqd.bundle.layout import BUILD_INPUTS
    from ptqd.stages.common import digest

    return digest(b, BUILD_INPUTS)


def peak_rss(bundle: Path, engine: str, batch: int) -> float | None:
    """Peak resident MiB (VmHWM) of a fresh process that opens one engine and runs one forward."""
    code = (f"OV={OV!r};import sys,json;from ptqd import api;from ptqd.bundle import Bundle;from ptqd.facts import "
            "seeded_unet_inputs;from ptqd.engines.onnxruntime import OrtRunner;b=Bundle.open(sys.argv[1]);p=sys.argv[2];"
            "ov=p.endswith(OV);p=p[:-len(OV)] if ov else p;"
            "r=OrtRunner(b.path('unet.onnx'),2) if p=='ort-fp32' else api.open_engine(b,p,2,"
            "backend='openvino' if ov else 'onnxruntime');"
            "f=seeded_unet_inputs(b.facts,int(sys.argv[3]),501.0,0);r(f['x'],f['t'],f.get('context'));"
            "print([l for l in open('/proc/self/status').read().splitlines() if l.startswith('VmHWM')][0].split()[1])")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(bundle), engine, str(batch)], capture_output=True,
                             text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1]) / 1024
    except (subprocess.CalledProcessError, OSError, ValueError, IndexError):
        return None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("small", "mid", "full"), default="mid")
    ap.add_argument("--work", default="speed-bench")
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--samples", type=int, default=1, help="calibration trajectories (speed does not depend on them)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounding", default="nearest")
    ap.add_argument("--validate", action="store_true", help="validate the engines against fake quant while building")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager peer")
    ap.add_argument("--no-peers", action="store_true", help="skip the OpenVINO / NNCF peers")
    ap.add_argument("--no-openvino", action="store_true", help="skip ptqd's own OpenVINO engines")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-engine resident memory processes")
    ap.add_argument("--calib-items", type=int, default=16, help="NNCF calibration inputs")
    ap.add_argument("--f32-rows", action="store_true",
                    help="also time every OpenVINO model with its float parts in f32 (NAME@f32); each is "
                         "compiled again: at 400.9 M that needs more than 23 GiB")
    args = ap.parse_args(argv)

    from ptqd import api
    from ptqd.bundle import Bundle
    from ptqd.engines.onnxruntime import OrtRunner
    from ptqd.facts import seeded_unet_inputs

    work = Path(args.work)
    bundle = prepare(work, args.size, args.samples, args.steps, args.rounding, args.validate,
                     openvino=not args.no_openvino)
    b = Bundle.open(bundle)
    built = b.read_json(api.BUILD_JSON)
    notes: list[str] = [f"engines from a fast calibration ({args.rounding} rounding, {args.samples} trajectory, "
                        f"{args.steps} steps): speed and size do not depend on weight values"]
    runners, load_s, sizes = {}, {}, {}
    t0 = time.perf_counter()
    runners["ort-fp32"] = OrtRunner(b.path(api.UNET_ONNX), args.threads, allow_spinning=False)
    load_s["ort-fp32"] = time.perf_counter() - t0
    sizes["ort-fp32"] = sum(p.stat().st_size for p in b.root.glob("unet.onnx*"))
    for p in OURS + (PEER,):
        t0 = time.perf_counter()
        runners[p] = api.open_engine(b, p, args.threads, allow_spinning=False)
        load_s[p] = time.perf_counter() - t0
        sizes[p] = onnx_bytes(Path(b.root, built[p]["buckets"][0]["engine"]))
    ov_built = b.read_json("engines/openvino/build.json") if b.has("engines/openvino/build.json") else {}
    for p in OURS if ov_built else ():
        t0 = time.perf_counter()
        runners[p + OV] = api.open_engine(b, p, args.threads, backend="openvino")
        load_s[p + OV] = time.perf_counter() - t0  # compiling happens at the first call (per batch size)
        sizes[p + OV] = ov_built[p]["size_bytes"]
    if not ov_built:
        notes.append("ptqd's OpenVINO engines skipped: " + ("--no-openvino" if args.no_openvino else
                                                            "openvino is not installed (pip install 'ptqd[openvino]')"))
    if not args.no_torch:
        import torch

        from ptqd.engines.torch_ref import TorchRunner
        from ptqd.stages.common import load_source

        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        runners["torch-fp32"] = TorchRunner(load_source(b).unet)
        load_s["torch-fp32"] = time.perf_counter() - t0
    if not args.no_peers:
        from ptqd.tools.peers import openvino_peers

        for k, (r, s) in openvino_peers(b, args.threads, args.calib_items, notes).items():
            runners[k], load_s[k], sizes[k] = r, s, None
    if args.f32_rows:
        from ptqd.engines.openvino import OvRunner

        for k in [k for k, r in runners.items() if isinstance(r, OvRunner) and r.float_precision != "f32"]:
            runners[k + "@f32"] = OvRunner(runners[k].path, args.threads, model=runners[k].model, float_precision="f32")
            load_s[k + "@f32"], sizes[k + "@f32"] = load_s[k], sizes.get(k)
    fpp = {k: r.float_precision for k, r in runners.items() if hasattr(r, "float_precision")}
    names = list(runners)
    result = {"size": args.size, "float_precision": fpp, "threads": args.threads, "runs": args.runs, "warmup": args.warmup,
              "parameters": None, "batches": {}, "notes": notes, "machine": _machine()}
    batches = [int(x) for x in args.batches.split(",")]
    first_batch = batches[0]
    for batch in batches:
        f = seeded_unet_inputs(b.facts, batch, 501.0, 0)
        call = (f["x"], f["t"], f.get("context"))
        for k in list(runners):  # first call outside the timing (OpenVINO compiles per batch here)
            try:
                t0 = time.perf_counter()
                runners[k](*call)
                if batch == first_batch:  # load time = opening + the first forward (OpenVINO compiles there)
                    load_s[k] += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                if k in ("ort-fp32", PEER, *OURS):
                    raise
                notes.append(f"{k} skipped: {type(e).__name__}: {str(e)[:200]}")
                del runners[k]
        names = list(runners)
        # interleaved rounds, each starting one engine later (ptqd.engines.runner.round_robin)
        times = round_robin({k: (lambda k=k: runners[k](*call)) for k in names}, runs=args.runs, warmup=args.warmup)
        med = {k: float(np.median(v)) for k, v in times.items()}
        result["batches"][batch] = {k: {"median_ms": 1e3 * med[k], "min_ms": 1e3 * float(np.min(times[k])),
                                        "vs_ort_fp32": med["ort-fp32"] / med[k],
                                        "vs_ort_int8": med[PEER] / med[k]} for k in names}
    names = [k for k in load_s if any(k in r for r in result["batches"].values())]
    result["engines"] = {k: {"size_bytes": sizes.get(k), "size_vs_fp32": (sizes[k] / sizes["ort-fp32"]) if sizes.get(k)
                             else None, "load_s": load_s[k]} for k in names}
    if not args.no_memory:
        for k in ["ort-fp32", *OURS, PEER, *(p + OV for p in OURS if p + OV in result["engines"])]:
            result["engines"][k]["peak_rss_mib"] = peak_rss(b.root, k, 1)
    (work / f"speed_{args.size}.json").write_text(json.dumps(result, indent=2))
    print(f"\ncin256-v2 family, {args.size}; {args.threads} threads, spinning off, interleaved rounds, median of "
          f"{args.runs} after {args.warmup} warm-up ({result['machine']})")
    head = "".join(f"{'batch ' + str(bt) + ' ms':>14}{'x fp32':>8}{'x int8':>8}" for bt in result["batches"])
    print(f"{'engine':<16}{head}{'MB':>9}{'1/size':>8}{'load s':>8}{'RSS MiB':>9}")
    for k in names:
        cells = "".join(f"{r[k]['median_ms']:14.1f}{r[k]['vs_ort_fp32']:8.2f}{r[k]['vs_ort_int8']:8.2f}" if k in r
                        else f"{'-':>14}{'-':>8}{'-':>8}" for r in result["batches"].values())
        e = result["engines"][k]
        size = f"{e['size_bytes'] / 1e6:9.1f}{1 / e['size_vs_fp32']:8.2f}" if e["size_bytes"] else f"{'-':>9}{'-':>8}"
        rss = e.get("peak_rss_mib")
        print(f"{k:<16}{cells}{size}{e['load_s']:8.2f}{(f'{rss:9.0f}' if rss else '-'.rjust(9))}")
    for n in notes:
        print(f"note: {n}")
    return result


def _machine() -> str:
    import onnxruntime

    from ptqd.resources import cpu_description

    return f"{cpu_description()}, onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    main()
