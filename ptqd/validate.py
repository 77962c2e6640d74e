"""Checks on values where they enter ptqd: numeric options, output paths, JSON for output (stdlib only).

Each check raises a one-line :class:`~ptqd.errors.UserError` that names the option, says what was
expected and what came. Options are named as on the command line (``--guidance``); the Python API
takes the same names without the dashes.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any

from ptqd.errors import NonFiniteError, UserError


def show(value: Any, limit: int = 60) -> str:
    """repr(value), shortened: error messages stay one readable line."""
    r = repr(value)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def finite(value: Any) -> bool:
    """A real number that a float can hold (NaN, infinities and ints beyond 1e308 are not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def real(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in [lo, hi] (open at an end with ``lo_open`` / ``hi_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a number, got {show(value)}")
    if not finite(value):
        raise NonFiniteError(f"{name} must be a finite number, got {show(value)}")
    v = float(value)
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        raise UserError(f"{name} must be in {'(' if lo_open or lo is None else '['}{left}, {right}"
                        f"{')' if hi_open or hi is None else ']'}, got {v:g}")
    return v


def integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (bools and floats are refused, not rounded)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name} must be an integer, got {show(value)}")
    v = int(value)
    if lo is not None and v < lo or hi is not None and v > hi:
        if hi is None:
            raise UserError(f"{name} must be >= {lo}, got {show(v)}")
        if lo is None:
            raise UserError(f"{name} must be <= {hi}, got {show(v)}")
        raise UserError(f"{name} must be between {lo} and {hi}, got {show(v)}")
    return v


def output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be written: not a directory, and its nearest existing
    ancestor a directory this process may create files in (the missing ones are made at write time)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {p}: is a directory; give a file name")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{option} {p}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{option} {p}: cannot write in {anc} (permission denied); choose another place")
    if p.exists() and not os.access(p, os.W_OK):
        raise UserError(f"{option} {p}: the file exists and is not writable")
    return p


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN and infinity replaced by None, so ``json.dumps(..., allow_nan=False)``
    prints strict JSON (``NaN`` is not JSON; a reader would reject the whole document)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def config_value(where: str, value: Any, kind: type, lo: float | None = None, hi: float | None = None,
                 error: type[Exception] = UserError) -> Any:
    """A value from a model config: ``kind`` (int, float, bool or str) and, for numbers, within
    [lo, hi]. ``where`` names it (``unet_config.params.model_channels``). No coercion: ``"192"`` is not
    an int, ``1`` is not a bool, so a typo never turns into a silently different model."""
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, numbers.Integral) and not isinstance(value, bool) if kind is int else
          isinstance(value, numbers.Real) and not isinstance(value, bool) if kind is float else
          isinstance(value, kind))
    if not ok:
        raise error(f"config: {where} must be {_KIND_NAMES.get(kind, kind.__name__)}, got {show(value)}")
    if kind in (int, float):
        if not finite(value):
            raise error(f"config: {where} must be a finite number, got {show(value)}")
        if lo is not None and value < lo or hi is not None and value > hi:
            left, right = ("-inf" if lo is None else f"{lo:g}"), ("inf" if hi is None else f"{hi:g}")
            raise error(f"config: {where} must be in [{left}, {right}], got {show(value)}")
        return kind(value)
    return value


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


MAX_SAMPLES = 10_000_000


def sampling_counts(num: Any = 1, batch: Any = 1, seed: Any = 0, sample_shape: tuple[int, ...] | None = None,
                    itemsize: int = 1) -> None:
    """``--num``, ``--batch``, ``--seed``; with ``sample_shape``, also that ``num`` samples fit in memory
    (they are returned together), so a huge ``--num`` fails at once instead of after allocating."""
    integer("--num", num, 1, MAX_SAMPLES)
    integer("--batch", batch, 1)
    integer("--seed", seed, 0)
    if sample_shape is not None:
        need = num * math.prod(sample_shape) * itemsize
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
            return
        if need > have:
            raise UserError(f"--num {num}: the samples would take {need / 1e9:.1f} GB of memory, more than this "
                            f"machine's {have / 1e9:.1f} GB; sample fewer at a time")
