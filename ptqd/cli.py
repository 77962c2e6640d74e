"""``ptqd``: the command line, a thin shell over :mod:`ptqd.api`.

A user error prints one line (``ptqd: error: ...``) and exits 1; ``--debug`` shows the
traceback. Anything else is a ptqd bug and is shown with its traceback (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from ptqd import __version__
from ptqd.errors import PtqdError

EPILOG = """\
pipeline:  export -> calibrate -> build -> sample / eval / bench   (one bundle directory)

examples:
  ptqd export models/ldm/cin256-v2/model.ckpt --config configs/latent-diffusion/cin256-v2.yaml --out cin.bundle
  ptqd export path/to/diffusers-ldm --out ldm.bundle
  ptqd inspect cin.bundle
"""


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000.0
    return f"{n} {unit}"


def cmd_export(args) -> int:
    from ptqd import api

    schedule = api.parse_schedule(args.schedule) if args.schedule else None
    rec = api.export(args.model, args.out, config=args.config, schedule=schedule,
                     first_stage=not args.no_first_stage, validate=not args.no_validate, opset=args.opset,
                     exporter=args.exporter)
    val = rec.get("validation", {})
    checks = ", ".join(f"{k} max|onnx-torch| {v['worst_abs_error']:.2e}" for k, v in val.items()) or "validation off"
    print(f"exported {args.model} -> {args.out} ({checks})")
    return 0


def cmd_inspect(args) -> int:
    from ptqd import api

    info = api.inspect(args.bundle)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["model"]
    cond = m["conditioning"]
    s = m["schedule"]
    print(f"bundle      {info['bundle']}  (schema v{info['schema_version']}, ptqd {info['producer'].get('version', '?')})")
    print(f"model       {m['family']} from {m['source']}; latent {'x'.join(map(str, m['latent_shape']))}"
          + (f", image {'x'.join(map(str, m['image_shape']))}" if m.get("image_shape") else ""))
    if cond["kind"] == "class":
        print(f"condition   class: {cond['num_classes']} classes, null class {cond['null_class']} "
              f"(context {cond['context_tokens']}x{cond['context_dim']})")
    else:
        print("condition   none (unconditional)")
    print(f"schedule    {s['kind']} beta {s.get('beta_start', '-')} -> {s.get('beta_end', '-')}, "
          f"T={s['num_train_timesteps']}, {m['prediction_type']}")
    if "macs_per_forward" in info:
        by = info["macs_by_kind"]
        n = info["layer_count"]
        print(f"MACs/fwd    {_human(info['macs_per_forward'], 'MAC')} at batch 1: conv {_human(by['conv'], 'MAC')}, "
              f"linear {_human(by['linear'], 'MAC')}, attention {_human(by['attention'], 'MAC')}")
        print(f"layers      {sum(n.values())}: {n['conv']} conv, {n['linear']} linear, {n['attention']} attention "
              f"matmuls; {info['weight_params'] / 1e6:.2f} M weight parameters")
    print(f"stages      {', '.join(info['stages']) or 'none'}")
    print(f"files       {_human(info['total_bytes'])} in {len(info['files'])} files (checksums verified)")
    for rel, size in info["files"].items():
        print(f"  {_human(size):>10}  {rel}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ptqd", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Compile a latent diffusion UNet into post-training-quantized engines (PTQD).")
    p.add_argument("--version", action="version", version=f"ptqd {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
    e.set_defaults(func=cmd_export)

    i = sub.add_parser("inspect", help="model facts, MACs, layers and files of a bundle",
                       description="Print what a bundle holds; verifies every file's checksum.")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except PtqdError as e:
        if args.debug:
            raise
        print(f"ptqd: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ptqd: interrupted; the bundle was left as it was", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
