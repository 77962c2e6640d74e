"""The CLI's argument parser: one sub-command per verb, and ``--help`` that teaches."""

from __future__ import annotations

import argparse

from ptqd import __version__
from ptqd.cli.cluster import cmd_serve
from ptqd.cli.commands import (
    cmd_bench,
    cmd_build,
    cmd_calibrate,
    cmd_check,
    cmd_compile,
    cmd_correct,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_inspect,
    cmd_lint,
    cmd_pack,
    cmd_plan,
    cmd_report,
    cmd_sample,
    cmd_train_demo,
)
from ptqd.precision import ORT_BUILDABLE


class UsageError(Exception):
    """A wrong flag or argument: one line, exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong flag on one line (exit 1, like every user error), not a usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


EPILOG = """\
pipeline:  export -> calibrate -> build -> correct (+ plan) -> sample / eval   (one bundle directory)
           ptqd compile runs the first four, resumably; ptqd check gates engine regressions in CI

examples:
  ptqd export models/ldm/cin256-v2/model.ckpt --config configs/latent-diffusion/cin256-v2.yaml --out cin.bundle
  ptqd export path/to/diffusers-ldm --out ldm.bundle
  ptqd inspect cin.bundle
  ptqd calibrate cin.bundle && ptqd build cin.bundle --precisions w8a8,w4a8,w4a4,ort-int8
  ptqd sample cin.bundle --classes 88,207 --num 16 --out samples.png
  ptqd compile demo --out d.bundle && ptqd sample d.bundle --plan auto --out plan.png
  ptqd eval demo-out/demo.bundle --precisions fp32,w4a8,auto --num 500
  ptqd eval demo-out/demo.bundle --ablation

memory:    each heavy stage estimates its peak before it starts and refuses (one line, naming the flag that
           makes it fit) where the machine has less available; PTQD_MEMORY_AVAILABLE=6G pretends less.
           A killed compile (even kill -9) resumes from the stage, and the engine, it was building.
"""


def _runtime_backend_arg(p, fp32: str) -> None:
    """``--backend`` of the verbs that run engines; ``fp32`` says where their FP32 runs on openvino."""
    p.add_argument("--backend", choices=("auto", "onnxruntime", "openvino"), default="auto",
                   help="the engines' backend: auto (default: the one `ptqd build --backend auto` timed fastest for "
                        "this bundle, else onnxruntime), onnxruntime, or openvino (engines from `ptqd build --backend "
                        f"openvino`; {fp32})")


def _sampling_args(p, num: int | None) -> None:
    what = f"default {num}" if num is not None else "default 16, or one per --prompt"
    p.add_argument("--num", type=int, default=num, help=f"number of samples in total ({what})")
    p.add_argument("--classes", help="comma-separated class labels, cycled over the samples (default: all classes)")
    p.add_argument("--seed", type=int, default=0, help="sample i's noise depends only on (seed, i): samples are "
                                                       "paired across engines (default 0)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20; DDIM on CompVis spacing: "
                                                         "t = 951, 901, ..., 1)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta: 0 = deterministic, 1 = DDPM-like (default 0)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")


def _sampler_arg(p) -> None:
    from ptqd.runtime.schedulers import SAMPLER_CHOICES

    p.add_argument("--sampler", default="auto", choices=("auto",) + SAMPLER_CHOICES, metavar="NAME",
                   help="auto (default: the bundle's own; for a diffusers pipeline, its scheduler and config; else "
                        "DDIM on CompVis spacing) or one of " + ", ".join(SAMPLER_CHOICES) + " (dpm++2m: DPM-Solver++ "
                        "2M; -karras: on Karras sigmas; euler-a: Euler ancestral), configured from the bundle's "
                        "scheduler config as diffusers' from_config does")


def _fit_sampler_arg(p) -> None:
    from ptqd.runtime.schedulers import SAMPLER_CHOICES

    p.add_argument("--sampler", default="auto", choices=("auto",) + SAMPLER_CHOICES, metavar="NAME",
                   help="the sampler the correction, its gate and the plan are fitted on, at the timesteps it visits: "
                        "auto (default: the bundle's own, what `ptqd sample` runs; for a diffusers pipeline its "
                        "scheduler, else DDIM on CompVis spacing) or one of " + ", ".join(SAMPLER_CHOICES)
                        + ", for a bundle you will sample with another (`ptqd sample --sampler` the same)")


def _ray_args(p, batch: int | None, shards: bool = True) -> None:
    g = p.add_argument_group("spread over Ray workers (pip install 'ptqd[cluster]')")
    g.add_argument("--ray", metavar="ADDRESS",
                   help="run shards of the samples on Ray workers: local (a Ray instance on this machine, for this "
                        "run), auto (the cluster this machine joined) or a Ray address (ray://head:10001). Results "
                        "equal a run without --ray: sample and eval bit for bit, calibrate and correct where the "
                        "workers' torch threads equal this process's")
    g.add_argument("--workers", type=int, help="Ray workers, each opening the bundle's engines once (default: CPUs / "
                                               "--threads)")
    g.add_argument("--threads", type=int, help="CPU threads per worker (default 1); each worker asks Ray for as "
                                               "many CPUs")
    g.add_argument("--gpus-per-worker", type=float, help="GPUs each worker asks Ray for (TensorRT engines: 1; "
                                                         "default 0)")
    if not shards:  # calibrate: one trajectory chunk per shard
        p.set_defaults(shard_size=None)
        return
    size = f"--batch, {batch}" if batch else "the preset's trajectory batch"
    g.add_argument("--shard-size", type=int, help=f"samples per shard, a multiple of the batch (default {size}); a "
                                                  "failed worker's shard runs again elsewhere")


def _effort_args(p, device: bool = True) -> None:
    from ptqd.budget import BUDGETS

    p.add_argument("--preset", choices=BUDGETS, default="auto",
                   help="compute preset: trajectories for calibrate, correct and plan (default auto: by the "
                        "model's MACs per forward; minimal | quick | default | thorough, see ptqd/budget.py)")
    if device:
        p.add_argument("--device", default="auto",
                       help="torch device of the calibration and correction work: auto (cuda when torch sees a GPU, "
                            "else cpu), cpu, cuda or cuda:N")



def _weight_grid_arg(p) -> None:
    p.add_argument("--weight-grid", choices=("portable", "full", "auto"), default="portable",
                   help="8-bit weights' grid: portable = ±63 (default: exact on every x86 CPU's int8 kernels), full "
                        "= ±127 (one more bit of weight precision; exact only on CPUs with VNNI or AMX, and its "
                        "engines are refused elsewhere), auto = full where this CPU has VNNI or AMX")


def _attention_arg(p) -> None:
    p.add_argument("--attention", choices=("float", "qk", "int8"), default="float",
                   help="attention matmuls (activation x activation): float (default), qk = Q·Kᵀ on 8-bit q and k, "
                        "int8 = Q·Kᵀ and P·V on 8-bit inputs, in every precision (ONNX Runtime and OpenVINO "
                        "engines; TensorRT builds need float). Speed and error: docs/speed-and-size.md")


def _outliers_args(p) -> None:
    p.add_argument("--outliers", choices=("none", "smooth", "lowrank", "svd"), default="none",
                   help="rewrite the 4-bit layers before export (fitted on FP trajectories): smooth = activation outliers "
                        "moved into the weights per input channel (SmoothQuant, alpha searched per layer), lowrank = a "
                        "low-rank branch beside each layer on 8-bit kernels (SVDQuant; float in w8a8), svd = both; none "
                        "(default). Quality and cost: docs/calibration.md, 'W4A4: outliers out of the 4-bit path'")
    p.add_argument("--rank-budget", type=float, default=0.05,
                   help="the low-rank branch's MACs as a share of its layer's (default 0.05)")
    p.add_argument("--outlier-layers", type=float, default=1.0, metavar="SHARE",
                   help="rewrite only this share of the 4-bit layers, those where the rewrite lowers the layer's "
                        "4-bit error most (default 1: all). Each rewritten layer costs CPU engines about the same "
                        "time whatever its rank, so fewer layers is faster")


def _gate_args(p) -> None:
    p.add_argument("--gate-samples", type=int, default=None,
                   help="held-out trajectories on which the end-to-end gate decides what --correction auto applies "
                        "(default: the preset's: 2 x the correction's trajectories; 16 for quick; none for minimal; "
                        "0 = no gate, and --correction auto applies nothing)")
    p.add_argument("--gate-ranges", type=int, default=None,
                   help="step ranges the gate decides separately (default: the preset's, 4; 1 for quick)")
    p.add_argument("--gate-budget", type=float, default=None, metavar="SECONDS",
                   help="about how long the gate may take, all precisions together; from the measured time of a "
                        "sampler step it is narrowed to fit (two candidates, then one range, then fewer samples, "
                        "never below 16) and says so (default 150; 0 = the preset's whole gate)")

def _plan_args(p) -> None:
    p.add_argument("--criterion", choices=("sensitivity", "snr"), default="sensitivity",
                   help="plan rule: measured per-step sensitivity under a BOPs budget (default), or PTQD's SNR rule")
    p.add_argument("--budget", type=float, default=0.9,
                   help="sensitivity: mean BOPs per step at most this multiple of w4a8's (default 0.9)")
    p.add_argument("--margin", type=float, default=1.0,
                   help="snr: a step may use precision p when SNR_Q(p) >= margin x SNR_F (default 1)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ptqd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile a latent diffusion UNet into post-training-quantized engines (PTQD).")
    p.add_argument("--version", action="version", version=f"ptqd {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    cp = sub.add_parser("compile", help="export -> calibrate -> build -> correct -> plan, resumable",
                        description="The whole pipeline into one bundle. A finished stage whose inputs are unchanged "
                                    "is reused, so a rerun after an interruption continues where it stopped.")
    cp.add_argument("model", help="demo, a diffusers directory or a CompVis .ckpt/.safetensors")
    cp.add_argument("--out", required=True, help="bundle directory")
    cp.add_argument("--config", help="CompVis YAML config")
    cp.add_argument("--precisions", default=",".join(map(str, ORT_BUILDABLE)),
                    help="engines to build (default: %(default)s; ort-int8 is ONNX Runtime's own quantize_static, "
                         "the reference, left out with a note where it alone would not fit in memory)")
    cp.add_argument("--backend", choices=("onnxruntime", "auto"), default="onnxruntime",
                    help="onnxruntime (default), or auto: OpenVINO's engines too where openvino is installed, then a "
                         "short timing records the faster backend, which sample, eval and ptqd.Pipeline then run")
    cp.add_argument("--samples", type=int, default=None, help="calibration trajectories (default: the preset's)")
    cp.add_argument("--steps", type=int, default=None, help="DDIM steps of the calibrated schedule (default: the "
                                                            "preset's, 20 up to quick)")
    cp.add_argument("--guidance", type=float, default=3.0, help="CFG scale of calibration and correction (default 3)")
    _plan_args(cp)
    _effort_args(cp)
    cp.add_argument("--prompts", help="text-to-image models: calibration prompts, one a line (default: a built-in "
                                      "list of 8)")
    cp.add_argument("--recipe", choices=("default", "ptqd-paper"), default=None,
                    help="calibration recipe: ptqd-paper = per-tensor weights, nearest rounding, min-max ranges")
    _weight_grid_arg(cp)
    _attention_arg(cp)
    _outliers_args(cp)
    _fit_sampler_arg(cp)
    _gate_args(cp)
    cp.add_argument("--force", action="store_true", help="rerun every stage")
    _ray_args(cp, None, shards=False)
    cp.set_defaults(func=cmd_compile)

    e = sub.add_parser("export", help="UNet -> validated FP32 ONNX bundle with a layer table",
                       description="Export a UNet (and its first-stage decoder) to a new bundle. The ONNX graph is "
                                   "checked against torch at several timesteps; the bundle is only written if it "
                                   "matches.")
    e.add_argument("model", help="a diffusers directory (pipeline or bare unet) or a CompVis .ckpt/.safetensors")
    e.add_argument("--out", required=True, help="bundle directory to create (replaced atomically if it exists)")
    e.add_argument("--config", help="CompVis YAML config (default: <checkpoint>.yaml or config.yaml beside it)")
    e.add_argument("--schedule", help="noise schedule KIND:BETA_START:BETA_END:T when the model has none "
                                      "(e.g. scaled_linear:0.0015:0.0195:1000)")
    e.add_argument("--no-first-stage", action="store_true", help="do not export the first-stage decoder")
    e.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs torch check (not advised)")
    e.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18: fast GroupNorm on ORT)")
    e.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch exporter (default torchscript: fast, module-scoped node names)")
    e.add_argument("--prompts", help="text-to-image models: calibration prompts, one a line (default: a built-in "
                                      "list of 8)")
    _outliers_args(e)
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="model facts, MACs, layers and files of a bundle",
                       description="Print what a bundle holds; verifies every file's checksum.")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("calibrate", help="observe activations over the denoising steps; quantize per precision",
                       description="Run the FP model along real sampler trajectories (classes x seeds, every step, "
                                   "CFG-doubled batch), choose activation ranges and round weights for w8a8, w4a8 "
                                   "and w4a4. Needs the source model the bundle was exported from.")
    c.add_argument("bundle")
    c.add_argument("--samples", type=int, default=None,
                   help="calibration trajectories (labels cycle the classes; default: the preset's, 32 for the demo)")
    c.add_argument("--steps", type=int, default=None, help="DDIM steps of the calibrated schedule (default: the "
                                                           "preset's, 20 up to quick)")
    c.add_argument("--eta", type=float, default=0.0, help="sampler eta of the calibration trajectories (default 0)")
    c.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the calibration trajectories (default 3)")
    c.add_argument("--method", choices=("mse", "minmax", "percentile"), default="mse",
                   help="activation range choice (default mse: clipping search)")
    c.add_argument("--rounding", choices=("nearest", "gptq"), default="gptq", help="weight rounding (default gptq)")
    c.add_argument("--recipe", choices=("default", "ptqd-paper"), default=None,
                   help="replaces --method/--rounding: ptqd-paper = per-tensor weights, nearest rounding, min-max")
    c.add_argument("--buckets", type=int, default=1, help="timestep buckets, each with its own activation scales and engine (default 1)")
    _weight_grid_arg(c)
    _attention_arg(c)
    _effort_args(c)
    _ray_args(c, None, shards=False)
    c.set_defaults(func=cmd_calibrate)

    bl = sub.add_parser("build", help="one engine per precision, validated against the fake-quant model",
                        description="Write a QDQ graph per precision and build its engine; each is checked against "
                                    "the fake-quant torch model. ort-int8 is ONNX Runtime's own quantize_static on "
                                    "the same calibration inputs, for comparison; nncf-int8, nncf-mixed and nncf-hybrid "
                                    "(--backend openvino, pip install 'ptqd[peers]') are NNCF's, the CPU peer.")
    bl.add_argument("bundle")
    bl.add_argument("--backend", choices=("onnxruntime", "openvino", "tensorrt", "auto"), default="onnxruntime",
                    help="onnxruntime (default; any CPU), openvino (Intel CPUs: the same calibration as OpenVINO IR, "
                         "conv outputs left in float, 4-bit weights stored as i4; pip install 'ptqd[openvino]'), "
                         "tensorrt (NVIDIA GPUs), auto "
                         "(onnxruntime and, where installed, openvino, then a short timing on this machine records the "
                         "faster in engines/backend.json: sample, eval and ptqd.Pipeline run it by default)")
    bl.add_argument("--precisions", default=None,
                    help="comma-separated (default: w8a8,w4a8,w4a4,ort-int8 on onnxruntime; w8a8,w4a8,w4a4 on "
                         "openvino, where nncf-int8, nncf-mixed and nncf-hybrid add NNCF + OpenVINO INT8 (its default "
                         "recipe; its mixed preset with the transformer model type; optimum-intel's hybrid mode) "
                         "for `ptqd eval`/`bench` to compare; "
                         "fp16,w8a8,w4a8,w4a4 on tensorrt)")
    bl.add_argument("--float-precision", choices=("auto", "bf16", "f32"), default="auto",
                    help="openvino: what the engines' float parts (GroupNorm, SiLU, residual adds, attention's core) "
                         "run in. auto (default): bf16 where the CPU computes it natively (avx512_bf16, amx_bf16), "
                         "if the engine then stays as close to FP32 as in f32, else f32; bf16: where native, "
                         "unchecked; f32: the fake-quant model's numerics. Engines are validated in f32, and run in "
                         "f32 on a CPU without native bf16 whatever was recorded")
    bl.add_argument("--act-grid", choices=("auto", "signed", "mixed", "unsigned"), default="auto",
                    help="openvino: the 8-bit grids of the quantized layers' inputs. auto (default): signed on a CPU "
                         "with AMX-INT8, unsigned elsewhere (chosen on the build machine; the numbers are the same "
                         "on any CPU). signed: every input with negative values on a symmetric int8 grid, which "
                         "OpenVINO runs on faster int8 kernels where the CPU has AMX (measured 1.1-1.2x, "
                         "docs/backend-openvino.md), at up to a bit of resolution on SiLU's outputs; mixed: only "
                         "inputs whose step widens by at most 1.25x (the transformer blocks'); unsigned: u8 with the "
                         "calibrated zero points (the ONNX Runtime engines' grids)")
    bl.add_argument("--no-validate", action="store_true", help="skip the check against the fake-quant model")
    bl.set_defaults(func=cmd_build)

    lt = sub.add_parser("lint", help="check each precision's QDQ graph against a backend's rules (CPU only)",
                        description="Check the QDQ graph of every precision against the target backend's rules "
                                    "(TensorRT: symmetric int8, constant positive scales, per-channel weight axes, "
                                    "INT4 only as block-quantized MatMul weights, Q/DQ where TensorRT fuses them, "
                                    "opset). Lints the built graphs, or the ones the calibration would build. "
                                    "Exits 1 when a rule is broken.")
    lt.add_argument("bundle")
    lt.add_argument("--target", choices=("tensorrt",), default="tensorrt")
    lt.add_argument("--json", action="store_true", help="machine-readable output")
    lt.set_defaults(func=cmd_lint)

    s = sub.add_parser("sample", help="sample images with one engine",
                       description="Sample with the FP32 graph or one engine; writes a PNG grid or an NPZ "
                                   "(images uint8 NxHxWxC, labels).")
    s.add_argument("bundle")
    _sampling_args(s, None)
    s.add_argument("--prompt", action="append", help="text-to-image bundles: a prompt (repeat for several; --num "
                                                     "images cycle through them)")
    s.add_argument("--prompts", help="text-to-image bundles: a file of prompts, one a line")
    s.add_argument("--negative-prompt", default="", help="what guidance steers away from (default \"\")")
    s.add_argument("--plan", "--precision", dest="plan", default="fp32",
                   help="fp32, an engine (w8a8, w4a8, w4a4, ort-int8), auto (the bundle's step-aware mixed-precision "
                        "plan) or a plan FILE.json (default fp32)")
    s.add_argument("--correction", choices=("auto", "on", "conditional", "off"), default="auto",
                   help="PTQD's noise correction and, with --eta > 0, variance schedule calibration (default auto: "
                        "the parts the end-to-end gate kept; on: the raw fit; conditional: E[error | eps_q] removed)")
    _runtime_backend_arg(s, "fp32 then runs on OpenVINO too")
    _sampler_arg(s)
    s.add_argument("--latents", metavar="FILE.npy",
                   help="the initial noise, [num, C, H, W] float (numpy.save), taken as diffusers' latents= takes it "
                        "(scaled by the sampler's init_noise_sigma): the same prompt, latents, steps and guidance "
                        "give the diffusers pipeline's own image")
    sx = s.add_argument_group("SDXL micro-conditioning (as diffusers' SDXL pipeline takes it; default: the image size, "
                              "no crop)")
    sx.add_argument("--original-size", metavar="H,W", help="original_size: the size the image should look taken at")
    sx.add_argument("--crop-top-left", metavar="TOP,LEFT", help="crops_coords_top_left (default 0,0)")
    sx.add_argument("--target-size", metavar="H,W", help="target_size")
    s.add_argument("--out", help="FILE.png (grid) or FILE.npz (arrays)")
    s.add_argument("--batch", type=int, default=64, help="samples per engine call (default 64)")
    _ray_args(s, 64)
    s.set_defaults(func=cmd_sample)

    v = sub.add_parser("eval", help="quality vs FP on the same seeds: FD, class accuracy, PSNR, eps MSE",
                       description="Evaluate precisions against FP32 on the same seeds and classes. FD uses the "
                                   "bundle's feature model (the demo ships one) or --features.")
    v.add_argument("bundle")
    _sampling_args(v, 500)
    v.add_argument("--precisions", default="fp32", help="comma-separated engines, e.g. fp32,ort-int8,w8a8,w4a8,w4a4; "
                                                        "FP32 is always the first row")
    v.add_argument("--features", help="ONNX model image [N,C,H,W] in [-1,1] -> 'features' (+ 'logits') for FD")
    v.add_argument("--correction", choices=("auto", "on", "conditional", "off"), default="auto",
                   help="apply PTQD's correction to every quantized row (default auto: the parts the end-to-end "
                        "gate kept)")
    v.add_argument("--ablation", action="store_true",
                   help="PTQD ablation for --precisions (default w4a8,w4a4,auto): uncorrected, + correlated "
                        "correction, + bias at eta 0; uncorrected, + k + bias, + VSC at eta 1")
    _runtime_backend_arg(v, "the FP32 reference row stays ONNX Runtime")
    _sampler_arg(v)
    v.add_argument("--batch", type=int, default=100, help="samples per engine call (default 100)")
    _ray_args(v, 100)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=cmd_eval)

    co = sub.add_parser("correct", help="fit PTQD's noise correction and the mixed-precision plan",
                        description="Run the FP and each precision's fake-quant model on the same x_t along FP "
                                    "trajectories; fit k_t, bias_t[c] and sigma_q,t per step (calib/correction.json), "
                                    "then the step-aware plan (calib/plan.json).")
    co.add_argument("bundle")
    co.add_argument("--samples", type=int, default=None, help="trajectories (default: the preset's, 64 for the demo)")
    co.add_argument("--holdout", type=int, default=None,
                    help="of those, held out to measure the fit (default: the preset's, 16 for the demo)")
    co.add_argument("--seed", type=int, default=1, help="trajectory seed (default 1; calibration uses 0)")
    co.add_argument("--batch", type=int, default=None, help="trajectories per model call (default: the preset's)")
    _fit_sampler_arg(co)
    _gate_args(co)
    _plan_args(co)
    _effort_args(co)
    _ray_args(co, None)
    co.set_defaults(func=cmd_correct)

    pl = sub.add_parser("plan", help="recompute the step-aware mixed-precision plan",
                        description="sensitivity (default): measure how much each step's precision moves the final "
                                    "samples away from FP's, then pick the plan with the least damage whose mean BOPs "
                                    "stay under --budget x the reference's. snr (PTQD's rule): per step the cheapest "
                                    "precision whose corrected quantization SNR clears --margin x the sample's SNR "
                                    "abar/(1-abar).")
    pl.add_argument("bundle")
    _plan_args(pl)
    pl.add_argument("--reference", default="w4a8", help="sensitivity: the precision the budget is relative to "
                                                         "(default w4a8)")
    _effort_args(pl, device=False)
    pl.set_defaults(func=cmd_plan)

    pk = sub.add_parser("pack", help="a deployable bundle: only what sampling one precision or the plan needs",
                        description="Copy into a new bundle only what the runtime needs to sample --plan on --backend: "
                                    "those engines, the decoder, the conditioning (class table, or text encoder and "
                                    "tokenizer), the correction and the plan, with a manifest of checksums. It loads "
                                    "like any bundle (ptqd sample, inspect); commands that need what it dropped "
                                    "(the FP32 graph, the calibration) say so and name the full bundle.")
    pk.add_argument("bundle")
    pk.add_argument("--plan", default="auto", help="auto (the bundle's step-aware plan, default), a precision "
                                                   "(w8a8, w4a8, w4a4, ort-int8) or fp32")
    pk.add_argument("--backend", choices=("onnxruntime", "openvino", "tensorrt"), default="onnxruntime",
                    help="whose engines to take (default onnxruntime)")
    pk.add_argument("--out", required=True, help="the packed bundle's directory (new, or a bundle to replace)")
    pk.set_defaults(func=cmd_pack)


    d = sub.add_parser("demo", help="the demo model end to end (README's main command)",
                       description="Export (or reuse) the demo bundle, sample a grid of digits, print the quality "
                                   "table.")
    d.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    _sampling_args(d, 500)
    d.set_defaults(func=cmd_demo)

    sv = sub.add_parser("serve", help="an HTTP JSON endpoint on Ray Serve: batched requests, replicas, /health",
                        description="Serve a bundle over HTTP on Ray Serve. POST /generate with a JSON body "
                                    "({\"prompt\": ...} or {\"class\": N}, and negative_prompt, steps, guidance, seed, "
                                    "num, precision) returns a PNG for one image or JSON with base64 PNGs; GET /health "
                                    "reports the server. Concurrent requests are batched into one UNet batch; the same "
                                    "seed gives the image `ptqd sample --seed` gives. Bad requests get a 4xx naming "
                                    "the field. Needs pip install 'ptqd[cluster]'.")
    sv.add_argument("bundle")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                         "only; 0.0.0.0 for every interface)")
    sv.add_argument("--port", type=int, default=8000, help="default 8000")
    sv.add_argument("--precisions", default="auto", help="comma-separated precisions to load, the first the default "
                                                         "of requests: auto (the plan), fp32, w8a8, ... (default auto)")
    _runtime_backend_arg(sv, "fp32 then runs on OpenVINO too")
    sv.add_argument("--replicas", type=int, default=1, help="generator replicas, each loading the engines once "
                                                            "(default 1)")
    sv.add_argument("--threads", type=int, default=1, help="CPU threads per replica (default 1)")
    sv.add_argument("--max-batch", type=int, default=8, help="samples batched into one UNet call across requests "
                                                             "(default 8)")
    sv.add_argument("--batch-wait-ms", type=float, default=50.0, help="how long a replica waits to fill a batch "
                                                                      "(default 50)")
    sv.add_argument("--max-num", type=int, default=4, help="images one request may ask for (default 4; at most "
                                                           "--max-batch)")
    sv.add_argument("--ray", default="local", metavar="ADDRESS", help="local (default: start Ray here) or the "
                                                                      "address of a Ray cluster")
    sv.set_defaults(func=cmd_serve)

    be = sub.add_parser("bench", help="latency, throughput, memory and size per engine; end-to-end sampling",
                        description="Time every engine (ONNX Runtime, and OpenVINO where built with `ptqd build "
                                    "--backend openvino`) and the peers (PyTorch eager FP32, ONNX Runtime FP32, ONNX "
                                    "Runtime quantize_static INT8, and where installed OpenVINO FP32 and NNCF + "
                                    "OpenVINO INT8) in one process, round-robin, medians after warm-up; ratios "
                                    "against ONNX Runtime FP32. Writes reports/bench.json. Real sizes: "
                                    "benchmarks/speed_at_size.py.")
    be.add_argument("bundle")
    be.add_argument("--precisions", help="engines to time (default: every built engine)")
    be.add_argument("--runs", type=int, default=20, help="timed runs per engine and batch (default 20, min 10)")
    be.add_argument("--large-batch", type=int, default=32, help="batch for throughput (default 32)")
    be.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's, one per core)")
    be.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager peer")
    be.add_argument("--no-peers", action="store_true",
                    help="skip the OpenVINO FP32 and NNCF + OpenVINO INT8 peers (timed where installed: "
                         "pip install 'ptqd[peers]')")
    be.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement (a process per engine)")
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    ck = sub.add_parser("check", help="regression gate for CI: engines vs a stored baseline",
                        description="Recompute seeded engine outputs and end-to-end samples; compare with the "
                                    "baseline (eps drift, sample drift, PSNR vs FP, FD, class accuracy). Exits 1 on "
                                    "a regression. Tolerances: see `python -c 'import ptqd.tools.check; "
                                    "help(ptqd.tools.check)'`.")
    ck.add_argument("bundle")
    ck.add_argument("--baseline", help="baseline JSON (NPZ beside it); default BUNDLE/reports/check_baseline.json")
    ck.add_argument("--update", action="store_true", help="write a new baseline from the current engines")
    ck.add_argument("--junit", help="also write JUnit XML here")
    ck.add_argument("--num", type=int, default=64, help="end-to-end samples when writing a baseline (default 64)")
    ck.set_defaults(func=cmd_check)

    rp = sub.add_parser("report", help="regenerate reports/: sample grids, correction and plan plots, index",
                        description="Side-by-side samples (FP, each engine, the plan; same seeds), plots of k_t, "
                                    "bias, sigma_q and the plan with its SNR curves, and an index.md.")
    rp.add_argument("bundle")
    rp.add_argument("--eval", action="store_true", help="rerun the quality evaluation first (--num samples)")
    rp.add_argument("--num", type=int, default=200)
    rp.add_argument("--bench", action="store_true", help="rerun the benchmark first")
    rp.set_defaults(func=cmd_report)

    t = sub.add_parser("train-demo", help="retrain the demo model and digit classifier (~20 min on 2 cores)")
    t.add_argument("--out", help="directory for the weights (default: the shipped ones, in place)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train_demo)
    p.commands = tuple(sub.choices)  # for error messages that point at `ptqd COMMAND --help`
    return p
