"""Wall time and peak resident memory of a whole process tree, polled every 50 ms.

    python benchmarks/peak_memory.py -- ptqd build BUNDLE --precisions ort-int8

The command runs as a child; its resident memory and that of every process it starts are summed at
each poll, so a stage that resets its own high-water mark, or work done in a subprocess, cannot hide
its peak. Prints one line (and ``--json FILE`` writes it); exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write {command, seconds, peak_rss_gb, returncode} here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to measure after --")
    from ptqd.resources import TreePeak

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with TreePeak(proc.pid) as watch:
        rc = proc.wait()
    res = {"command": cmd, "seconds": round(time.perf_counter() - t0, 1),
           "peak_rss_gb": round(watch.peak_bytes / 2**30, 3), "returncode": rc}
    print(f"peak_memory: {res['seconds']:.1f} s, whole-tree peak RSS {res['peak_rss_gb']:.2f} GiB, exit {rc}: "
          f"{' '.join(cmd)}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
