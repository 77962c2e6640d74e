"""``--backend auto``: time the bundle's engines on every CPU backend they were built for, on this machine, and
record the fastest (``engines/backend.json``, with the CPU it was timed on). ``sample``, ``eval``, ``bench``
and ``ptqd.Pipeline`` then run that backend unless told otherwise (``ptqd.runtime.loader.resolve_backend``).

The timing is short: the UNet at batch 1 and at the sampler's guided batch 2, every engine interleaved
round-robin in one process, the median of ``runs`` calls after warm-up. The score of a backend is the sum of
its medians over the precisions both backends have, so the choice serves the plan, which switches between
them.
"""

from __future__ import annotations

import numpy as np

from ptqd.bundle import Bundle, layout
from ptqd.engines.runner import round_robin
from ptqd.errors import UserError
from ptqd.facts import seeded_unet_inputs
from ptqd.precision import CALIBRATED_NAMES
from ptqd.resources import cpu_description

CPU_BACKENDS = ("onnxruntime", "openvino")


def choose_backend(bundle, runs: int = 7, warmup: int = 2, threads: int | None = None, log=None) -> dict:
    """Time the candidates, write ``engines/backend.json`` and return it. UserError when fewer than one backend
    has engines."""
    from ptqd.runtime.loader import open_engine

    b = Bundle.open(bundle)
    have = {be: [p for p in CALIBRATED_NAMES if p in layout.built(b, be)] for be in CPU_BACKENDS}
    candidates = [be for be in CPU_BACKENDS if have[be]]
    if not candidates:
        raise UserError(f"{b.root} has no engines to choose between: run `ptqd build {b.root}` first")
    common = [p for p in CALIBRATED_NAMES if all(p in have[be] for be in candidates)]
    batches = (1, 2) if b.facts.conditioning.guided else (1,)
    runners = {(be, p): open_engine(b, p, threads, allow_spinning=False, backend=be) for be in candidates
               for p in common}
    timed: dict[str, dict[str, dict[str, float]]] = {be: {p: {} for p in common} for be in candidates}
    for batch in batches:
        f = seeded_unet_inputs(b.facts, batch, 501.0, 0)
        times = round_robin({k: (lambda r=r: r(f["x"], f["t"], f.get("context"))) for k, r in runners.items()},
                            runs, warmup)
        for (be, p), ts in times.items():
            timed[be][p][str(batch)] = 1e3 * float(np.median(ts))
    for r in runners.values():
        r.close()
    score = {be: sum(v for p in common for v in timed[be][p].values()) for be in candidates}
    best = min(candidates, key=lambda be: score[be])
    rec = {"backend": best, "cpu": cpu_description(), "precisions": common, "batches": list(batches),
           "median_ms": timed, "score_ms": score, "runs": runs}
    with Bundle.transaction(b.root) as w:
        w.write_json(layout.BACKEND_CHOICE, rec)
    if log is not None:
        log(f"backend auto: {best} (" + ", ".join(f"{be} {score[be]:.1f} ms" for be in candidates)
            + f": sum of median UNet ms over {', '.join(common)} at batch {'/'.join(map(str, batches))}, "
            f"{rec['cpu']})")
    return rec
