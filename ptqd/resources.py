"""Memory: peak resident memory of a process tree, and what this machine has available (Linux /proc;
elsewhere ``None``). stdlib only.

Two ways to see a peak, used together:

* ``VmHWM`` of this process (exact, but per process, and :func:`reset_peak` starts a new window);
* :class:`TreePeak`, a thread that sums the resident memory of a process and all its descendants
  every 50 ms (what the kernel's out-of-memory killer weighs; misses spikes shorter than the period).

The available memory is ``PTQD_MEMORY_AVAILABLE`` when set (e.g. ``6G``, ``800M``, or bytes: for tests
and for machines shared with other work), otherwise the smaller of ``MemAvailable`` and what the
cgroup's ``memory.max`` leaves.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
ENV_AVAILABLE = "PTQD_MEMORY_AVAILABLE"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
GB = 1 << 30


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
    """Peak resident memory (MB) of this process since it started or the last :func:`reset_peak`."""
    kb = _status_kb("VmHWM")
    return None if kb is None else round(kb / 1024, 1)


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0  # gone meanwhile


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            out[int(name)] = int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm) state": ppid
        except (OSError, ValueError, IndexError):
            continue
    return out


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    parents = _parents()
    kids: dict[int, list[int]] = {}
    for p, pp in parents.items():
        kids.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(kids.get(p, []))
    return found


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident memory of ``pid`` (default: this process) and all its descendants, now."""
    return sum(_rss_bytes(p) for p in tree_pids(os.getpid() if pid is None else pid))


_WATCHING_SELF: list = []  # open TreePeak windows on this process, outermost first


class TreePeak:
    """Peak resident memory of a process tree, polled by a daemon thread every ``interval`` seconds
    while the context is open. ``peak_bytes`` also takes this process's own ``VmHWM`` since the context
    opened (when watching itself), so a spike between two polls is not lost."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.pid, self.interval = (os.getpid() if pid is None else pid), interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _poll(self) -> None:
        while True:
            self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TreePeak:
        if self.pid == os.getpid():
            own = int((peak_rss_mb() or 0) * (1 << 20))
            for outer in _WATCHING_SELF:  # a nested window resets VmHWM: the outer ones keep what it held
                outer.peak_bytes = max(outer.peak_bytes, own)
            _WATCHING_SELF.append(self)
            reset_peak()
        self._thread = threading.Thread(target=self._poll, name="ptqd-tree-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, tree_rss_bytes(self.pid))
        if self.pid == os.getpid():
            own = int((peak_rss_mb() or 0) * (1 << 20))
            _WATCHING_SELF.remove(self)
            for w in (self, *_WATCHING_SELF):
                w.peak_bytes = max(w.peak_bytes, own)

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / (1 << 20), 1)


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"6G"``, ``"800M"``, ``"1.5GiB"`` or plain bytes -> bytes. ValueError when it is none of these."""
    m = _SIZE.fullmatch(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (write e.g. 6G, 800M or a number of bytes)")
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_headroom() -> int | None:
    """What the cgroup (v2) memory limit still leaves this process, if it sets one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_bytes() -> tuple[int | None, str]:
    """Memory a new allocation can take before the kernel must kill something, and where that number
    came from. ``(None, why)`` where it cannot be known (not Linux)."""
    env = os.environ.get(ENV_AVAILABLE)
    if env:
        from ptqd.errors import UserError

        try:
            return parse_size(env), f"{ENV_AVAILABLE}={env}"
        except ValueError as e:
            raise UserError(f"{ENV_AVAILABLE}: {e}") from None
    avail = _meminfo_bytes("MemAvailable")
    cg = _cgroup_headroom()
    if cg is not None and (avail is None or cg < avail):
        return cg, "the cgroup's memory.max"
    return avail, "MemAvailable"



ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # u8·s8 products summed in 32 bits: no 16-bit saturation
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 arithmetic in hardware: where OpenVINO's CPU plugin picks bf16


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = "?", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "?":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    return model, flags


def cpu_isa() -> list[str]:
    """This CPU's instruction-set flags that decide the int8 kernels (of ISA_FLAGS)."""
    flags = _cpuinfo()[1]
    return [f for f in ISA_FLAGS if f in flags]


def has_vnni(isa: list[str] | None = None) -> bool:
    """Whether int8 kernels here sum u8·s8 products without 16-bit saturation (VNNI or AMX): the condition for
    8-bit weights on the full ±127 grid to be computed exactly by ONNX Runtime's u8s8 kernels."""
    return any(f in (cpu_isa() if isa is None else isa) for f in VNNI_FLAGS)


def has_native_bf16(isa: list[str] | None = None) -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16): where OpenVINO's CPU plugin runs a
    model's float parts in bf16 by default, and where ptqd's OpenVINO engines may (``ptqd build
    --float-precision``)."""
    return any(f in (cpu_isa() if isa is None else isa) for f in BF16_FLAGS)


def has_amx_int8(isa: list[str] | None = None) -> bool:
    """Whether this CPU has AMX's int8 tiles: where OpenVINO's CPU plugin runs a conv or matmul on an int8 input
    without a zero point on faster kernels than on a u8 input with one (``ptqd build --act-grid``)."""
    return "amx_int8" in (cpu_isa() if isa is None else isa)


def check_requirements(requires: dict | None, what: str, fix: str) -> None:
    """UserError when this CPU lacks what ``requires`` (an engine's ``requires`` record) names."""
    if not requires or requires.get("isa") != "vnni":
        return
    if not has_vnni():
        from ptqd.errors import UserError

        raise UserError(f"{what} has {requires['why']}; this CPU ({cpu_description()}) has neither, so it would "
                        f"compute wrong numbers here. {fix}")


def cpu_description() -> str:
    """The CPU model and the instruction-set flags that decide the int8 kernels, e.g. ``Intel(R) Xeon(R)
    Processor (avx2 avx512f avx512_vnni amx_int8 amx_bf16), 2 CPUs``: printed with every speed or memory table."""
    model = _cpuinfo()[0]
    isa = cpu_isa()
    return f"{model} ({' '.join(isa) or 'no AVX2'}), {os.cpu_count()} CPUs"
