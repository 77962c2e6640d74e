"""Peak resident memory of this process, per stage (Linux /proc; elsewhere ``None``)."""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kb(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Start a new peak-RSS window (VmHWM := VmRSS). False where the kernel does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float | None:
    """Peak resident memory (MB) since the process started or the last :func:`reset_peak`."""
    kb = _status_kb("VmHWM")
    return None if kb is None else round(kb / 1024, 1)
