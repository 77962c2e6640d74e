"""The bundle: ptqd's on-disk contract between stages (stdlib + numpy only).

Layout (see ARCHITECTURE.md): ``manifest.json`` lists every file with its sha256 and size,
the model facts (schedule, conditioning, latent shape) and one record per stage.

Guarantees:

* **Atomic updates.** A ``Bundle.transaction`` stages the next version of the bundle in a
  sibling directory (unchanged files are hard links, so this is cheap), writes the manifest
  last, then swaps directories. An interrupted stage leaves the previous bundle intact; a
  crash inside the swap itself (two renames) is repaired on the next open. One writer at a
  time: writers hold an advisory lock (``.<name>.lock`` beside the bundle).
* **Checksums.** Every file is verified against the manifest before it is used.
* **Containment.** A manifest path must be relative, inside the bundle, and free of ``..``.
* **Versioning.** ``schema_version`` newer than this ptqd understands is refused; older
  versions are migrated (none exist yet).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ptqd import __version__
from ptqd.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_STAGING = ".staging-"
_OLD = ".old-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_relpath(rel: str) -> str:
    """A manifest path: relative, POSIX, no ``..``, no drive or backslash. Returns it normalized."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise BundleError(f"manifest path {rel!r} is not a relative POSIX path")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~") or (len(rel) > 1 and rel[1] == ":"):
        raise BundleError(f"manifest path {rel!r} escapes the bundle; refusing to use it")
    if p.name == MANIFEST and len(p.parts) == 1:
        raise BundleError("manifest.json cannot list itself")
    return str(p)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _siblings(root: Path, marker: str) -> list[Path]:
    if not root.parent.exists():
        return []
    return sorted(root.parent.glob(f".{root.name}{marker}*"), key=lambda p: p.stat().st_mtime)


@contextlib.contextmanager
def _lock(root: Path, blocking: bool) -> Iterator[bool]:
    """An advisory lock beside the bundle (``.<name>.lock``): one writer at a time, and recovery
    never touches a directory that a live writer is using. Yields whether the lock was taken."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _recover(root: Path) -> None:
    """Repair what an interrupted swap or stage left beside ``root``. Call with the lock held."""
    olds = _siblings(root, _OLD)
    if not root.exists() and olds:
        os.rename(olds[-1], root)  # the swap died between its two renames: put the previous bundle back
        olds = olds[:-1]
    for leftover in olds + _siblings(root, _STAGING):
        shutil.rmtree(leftover, ignore_errors=True)


def _recover_if_idle(root: Path) -> None:
    if not root.parent.exists() or not (_siblings(root, _OLD) or _siblings(root, _STAGING)):
        return
    with _lock(root, blocking=False) as taken:
        if taken:  # no writer is running: what is left over is from a dead one
            _recover(root)


class Bundle:
    """A bundle opened for reading. Use :meth:`open`; files are verified on first access."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        root = Path(path)
        _recover_if_idle(root)
        mpath = root / MANIFEST
        if not root.is_dir():
            raise BundleError(f"bundle not found: {root} (create one with `ptqd export MODEL --out {root}`)")
        if not mpath.exists():
            raise BundleError(f"{root} is not a ptqd bundle: it has no {MANIFEST}")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}); the bundle is damaged, re-export it") from None
        return cls(root, cls._migrate(manifest, mpath))

    @staticmethod
    def _migrate(m: Any, where: Path) -> dict[str, Any]:
        if not isinstance(m, dict) or "schema_version" not in m:
            raise BundleError(f"{where} has no schema_version: not a ptqd manifest")
        v = m["schema_version"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BundleError(f"{where}: schema_version {v!r} is not a positive integer")
        if v > SCHEMA_VERSION:
            producer = m.get("producer", {}).get("version", "?")
            raise BundleError(
                f"bundle schema_version {v} is newer than this ptqd {__version__} understands "
                f"(up to {SCHEMA_VERSION}); it was written by ptqd {producer}: upgrade ptqd to read it"
            )
        files = m.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{where} has no 'files' table")
        for rel, rec in files.items():
            check_relpath(rel)
            if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
                raise BundleError(f"{where}: entry {rel!r} has no sha256")
        return m

    # ---- reading -------------------------------------------------------------------------
    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def has(self, rel: str) -> bool:
        return check_relpath(rel) in self.files

    def path(self, rel: str, verify: bool = True) -> Path:
        """Absolute path of a listed file, checked to be inside the bundle and to match its sha256."""
        rel = check_relpath(rel)
        if rel not in self.files:
            raise BundleError(f"{self.root} has no {rel!r} (listed: {', '.join(sorted(self.files)) or 'nothing'})")
        p = self.root / rel
        real_root = self.root.resolve()
        if real_root not in p.resolve().parents:
            raise BundleError(f"{rel!r} resolves outside the bundle (symlink?); refusing to use it")
        if verify and rel not in self._verified:
            if not p.is_file():
                raise BundleError(f"{self.root}: {rel} is listed in the manifest but missing on disk")
            digest = sha256_file(p)
            if digest != self.files[rel]["sha256"]:
                raise BundleError(
                    f"{self.root}: {rel} does not match its checksum (sha256 {digest[:12]}..., manifest says "
                    f"{self.files[rel]['sha256'][:12]}...): the file was modified or damaged; rebuild that stage"
                )
            self._verified.add(rel)
        return p

    def verify_all(self) -> None:
        for rel in self.files:
            self.path(rel)

    def read_json(self, rel: str) -> Any:
        return json.loads(self.path(rel).read_text())

    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.manifest.get("stages", {}).get(name)

    @property
    def facts(self):
        from ptqd.facts import ModelFacts

        if "model" not in self.manifest:
            raise BundleError(f"{self.root}: manifest has no 'model' section; re-export the bundle")
        return ModelFacts.from_json(self.manifest["model"])

    # ---- writing -------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def transaction(cls, path: str | os.PathLike, create: bool = False) -> Iterator["BundleWriter"]:
        """Stage changes to a bundle; they land together when the block exits without error.

        ``create=True`` starts a new bundle, replacing whatever bundle is at ``path`` (only on
        success). Otherwise the bundle must exist and unchanged files carry over.
        """
        root = Path(path)
        with _lock(root, blocking=True):
            _recover(root)
            if root.exists() and not root.is_dir():
                raise BundleError(f"{root} exists and is not a directory")
            if root.exists() and not create and not (root / MANIFEST).exists():
                raise BundleError(f"{root} is not a ptqd bundle (no {MANIFEST})")
            if root.exists() and create and any(root.iterdir()) and not (root / MANIFEST).exists():
                raise BundleError(f"{root} exists, is not empty and is not a ptqd bundle; choose another --out")
            previous = None if create or not root.exists() else cls.open(root)
            staging = root.parent / f".{root.name}{_STAGING}{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                writer = BundleWriter(root, staging, previous)
                yield writer
                writer._commit()
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise


class BundleWriter:
    """Collects one stage's writes in a staging directory; ``_commit`` swaps it in."""

    def __init__(self, root: Path, staging: Path, previous: Bundle | None):
        self.root, self.staging = root, staging
        self.manifest: dict[str, Any] = (
            json.loads(json.dumps(previous.manifest)) if previous else
            {"schema_version": SCHEMA_VERSION, "created": _now(), "files": {}, "stages": {}}
        )
        self._dirty: set[str] = set()
        if previous is not None:
            for rel in previous.files:
                src = previous.path(rel)  # verified: never carry a damaged file into a new version
                dst = staging / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)

    def file(self, rel: str) -> Path:
        """A path in the staging area to write ``rel`` to (any previous version is detached first)."""
        rel = check_relpath(rel)
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            p.unlink()  # it may be a hard link to the live bundle's file: never write through it
        self._dirty.add(rel)
        return p

    def declare(self, rel: str) -> None:
        """Record a file that a tool wrote into the staging area by itself (e.g. ONNX external data)."""
        rel = check_relpath(rel)
        if not (self.staging / rel).is_file():
            raise RuntimeError(f"internal: declared {rel} but it is not in the staging area")
        self._dirty.add(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.file(rel).write_bytes(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def remove(self, rel: str) -> None:
        rel = check_relpath(rel)
        self.manifest["files"].pop(rel, None)
        self._dirty.discard(rel)
        p = self.staging / rel
        if p.exists():
            p.unlink()

    def set_model(self, facts_json: dict[str, Any]) -> None:
        self.manifest["model"] = facts_json

    def set_stage(self, name: str, record: dict[str, Any]) -> None:
        self.manifest.setdefault("stages", {})[name] = record

    def drop_stage(self, name: str) -> None:
        """Forget a stage whose outputs this transaction invalidates (their files go with ``remove``)."""
        self.manifest.setdefault("stages", {}).pop(name, None)

    def listed(self, prefix: str = "") -> list[str]:
        """Files the next version of the bundle lists, under ``prefix``."""
        return sorted(r for r in self.manifest["files"] if r.startswith(prefix))

    def _commit(self) -> None:
        for rel in sorted(self._dirty):
            p = self.staging / rel
            if not p.is_file():
                raise BundleError(f"stage declared {rel} but did not write it")
            self.manifest["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        listed = set(self.manifest["files"])
        for p in self.staging.rglob("*"):  # stray files (e.g. ORT side outputs) must be listed or go
            rel = p.relative_to(self.staging).as_posix()
            if p.is_file() and rel not in listed:
                raise RuntimeError(f"internal: {rel} was written to the bundle but never declared")
        self.manifest["schema_version"] = SCHEMA_VERSION
        self.manifest["producer"] = {"name": "ptqd", "version": __version__}
        self.manifest["updated"] = _now()
        _write_atomic(self.staging / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())
        old = self.root.parent / f".{self.root.name}{_OLD}{uuid.uuid4().hex[:8]}"
        if self.root.exists():
            os.rename(self.root, old)
        os.rename(self.staging, self.root)
        shutil.rmtree(old, ignore_errors=True)
