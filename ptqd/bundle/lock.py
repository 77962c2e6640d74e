"""Writer locks and leftover recovery of bundles (see :mod:`ptqd.bundle.store` for the guarantees).

One writer at a time: an advisory ``flock`` on ``.<name>.lock`` beside the bundle, held from a stage's
first read to its commit (:func:`writes_bundle`). Staging and backup directories that a dead writer
left (``.<name>.staging-<hex>``, ``.<name>.old-<hex>``) are matched literally and repaired only while
no writer holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import os
import re
import shutil
import sys
import threading
from pathlib import Path
from typing import Iterator

from ptqd.errors import BundleError

STAGING_MARK = ".staging-"
OLD_MARK = ".old-"
SUFFIX = re.compile(r"[0-9a-f]+")  # what follows the marker: uuid4().hex[:8]


def real_root(path: str | os.PathLike) -> Path:
    """The directory a bundle path names, symlinks resolved: what writers lock and replace."""
    return Path(os.path.realpath(os.fspath(path)))


def leftovers(root: Path, marker: str) -> list[Path]:
    """``root``'s own leftovers ``.<name><marker><hex>``, oldest first. Names are compared literally:
    a bundle called ``g?`` or ``exp[1]`` matches nothing of ``g1``'s."""
    prefix = f".{root.name}{marker}"
    try:
        names = os.listdir(root.parent)
    except OSError:
        return []
    found = []
    for n in names:
        if n.startswith(prefix) and SUFFIX.fullmatch(n[len(prefix):]):
            p = root.parent / n
            try:
                found.append((p.lstat().st_mtime, p))
            except FileNotFoundError:  # removed meanwhile
                continue
    return [p for _, p in sorted(found)]


# Writer locks this process holds: lock path -> [owning thread, depth]. flock locks belong to an open
# file description, so a second open() in the same thread would wait for itself; a thread that holds a
# bundle's lock re-enters it instead (a stage calls transaction, compile calls every stage).
_HELD: dict[str, list[int]] = {}
_HELD_GUARD = threading.Lock()


@contextlib.contextmanager
def bundle_lock(root: Path, blocking: bool, make_parent: bool = False) -> Iterator[bool]:
    """An advisory lock beside the bundle (``.<name>.lock``): one writer at a time, and recovery
    never touches a directory that a live writer is using. Yields whether the lock was taken.

    Re-entrant within a thread for ``blocking=True``; ``blocking=False`` asks "is no writer running?",
    which is False inside this thread's own writer."""
    key = os.fspath(root.parent / f".{root.name}.lock")
    me = threading.get_ident()
    with _HELD_GUARD:
        held = _HELD.get(key)
        mine = held is not None and held[0] == me
        if mine and blocking:
            held[1] += 1
    if mine:
        if not blocking:
            yield False
            return
        try:
            yield True
        finally:
            with _HELD_GUARD:
                _HELD[key][1] -= 1
        return
    try:
        if make_parent:
            root.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        if not blocking:  # a reader on a read-only place: nothing can be repaired there anyway
            yield False
            return
        raise BundleError(f"cannot write the bundle {root}: {key}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                yield False
                return
            print(f"ptqd: waiting for another ptqd writer to finish with {root} ...", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with _HELD_GUARD:
            _HELD[key] = [me, 1]
        try:
            yield True
        finally:
            with _HELD_GUARD:
                del _HELD[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def writer_lock(path: str | os.PathLike, create: bool = False) -> Iterator[Path]:
    """Hold the writer lock of the bundle at ``path`` (resolved); yields the real bundle root.
    ``create``: the bundle may be new, so its parent folder is made. Otherwise, when there is no bundle
    at ``path`` (nor a backup to put back), there is nothing to protect: no lock is taken, the stage
    then fails to open it, and no folder or lock file is left behind."""
    root = real_root(path)
    if not create and not root.is_dir() and not leftovers(root, OLD_MARK):
        # no bundle to protect (nor one to put back): the stage says so, and leaves no lock file behind
        yield root
        return
    with bundle_lock(root, blocking=True, make_parent=create):
        yield root


def writes_bundle(arg: str = "bundle", when: str | None = None, create: bool = False):
    """Decorator for a stage: hold the bundle's writer lock from the stage's first read of the bundle
    to its commit. A second writer waits, then reads what the first committed, so neither update is
    lost. ``arg`` names the parameter that holds the bundle path; with ``when``, the lock is only taken
    if that parameter is true (e.g. ``write_report``); ``create`` for stages that may make the bundle."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            if when is not None and not bound.arguments[when]:
                return fn(*args, **kwargs)
            target = bound.arguments[arg]
            if not isinstance(target, (str, os.PathLike)):  # a Bundle: its root (a Path's .root is "/"!)
                target = target.root
            with writer_lock(target, create=create):
                return fn(*args, **kwargs)

        return wrapper

    return deco


def recover(root: Path) -> None:
    """Repair what an interrupted swap or stage left beside ``root``. Call with the lock held."""
    olds = [p for p in leftovers(root, OLD_MARK) if p.is_dir() and not p.is_symlink()]
    if not root.exists() and not root.is_symlink() and olds:
        os.rename(olds[-1], root)  # the swap died between its two renames: put the previous bundle back
        olds = olds[:-1]
    for leftover in olds + leftovers(root, STAGING_MARK):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def recover_if_idle(root: Path) -> None:
    if not root.parent.exists() or not (leftovers(root, OLD_MARK) or leftovers(root, STAGING_MARK)):
        return
    with bundle_lock(root, blocking=False) as taken:
        if taken:  # no writer is running: what is left over is from a dead one
            recover(root)
