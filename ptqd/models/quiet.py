"""Third-party chatter off on ptqd's normal path: diffusers' and transformers' warnings (e.g. that
``accelerate`` is not installed, printed at every model load) and their progress bars, while ptqd calls
them. ``ptqd --debug`` (``PTQD_DEBUG=1``) keeps all of it."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

LIBRARIES = ("diffusers", "transformers", "huggingface_hub")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    if os.environ.get("PTQD_DEBUG"):
        yield
        return
    loggers = [logging.getLogger(n) for n in LIBRARIES]
    levels = [lg.level for lg in loggers]
    bars = []
    for name in ("diffusers", "transformers"):
        try:
            mod = __import__(f"{name}.utils.logging", fromlist=["x"])
        except ImportError:
            continue
        if mod.is_progress_bar_enabled():
            mod.disable_progress_bar()
            bars.append(mod)
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            for name in LIBRARIES:
                warnings.filterwarnings("ignore", module=name)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for mod in bars:
            mod.enable_progress_bar()
