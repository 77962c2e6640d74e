"""The bundle: ptqd's on-disk contract between stages (stdlib + numpy only).

Layout (see ARCHITECTURE.md): ``manifest.json`` lists every file with its sha256 and size,
the model facts (schedule, conditioning, latent shape) and one record per stage.

Guarantees:

* **Atomic updates.** A ``Bundle.transaction`` stages the next version of the bundle in a
  sibling directory (unchanged files are hard links, so this is cheap), writes the manifest
  last, then swaps directories. An interrupted stage leaves the previous bundle intact; a
  crash inside the swap itself (two renames) is repaired on the next open. One writer at a
  time: writers hold an advisory lock (``.<name>.lock`` beside the bundle) from their first read
  of the bundle to their commit (:func:`writes_bundle`), so a concurrent writer waits and then
  sees the committed result: no update is lost. A symlinked bundle path is resolved first, so
  the real directory is updated and the link stays a link.
* **Leftovers.** Staging and backup directories are matched literally (``.<name>.staging-<hex>``,
  ``.<name>.old-<hex>``), never as glob patterns, and only cleaned up when no writer holds the lock.
* **User files.** Files in the bundle that the manifest does not list (notes, scripts) are not
  ptqd's: every stage carries them over untouched.
* **Checksums.** Every file is verified against the manifest (size, then sha256) before it is used.
* **Containment.** A manifest path must be relative, inside the bundle, and free of ``..``.
* **Versioning.** ``schema_version`` newer than this ptqd understands is refused; older
  versions are migrated (none exist yet).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from ptqd.version import __version__
from ptqd.bundle.lock import OLD_MARK, STAGING_MARK, real_root, recover, recover_if_idle, bundle_lock
from ptqd.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_FILE_SIZE = 1 << 50  # 1 PiB: larger sizes in a manifest are damage, not data


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


def _is_num(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The fields of stage records that later stages read, and what they must be.
_STAGE_FIELDS: dict[str, dict[str, Any]] = {
    "*": {"config": lambda v: isinstance(v, dict)},
    "export": {"source": lambda v: isinstance(v, str), "source_sha256": lambda v: v is None or isinstance(v, str)},
    "calibrate": {
        "config": lambda v: isinstance(v, dict) and all(k in v for k in ("steps", "eta", "guidance"))
        and _is_int(v["steps"]) and _is_num(v["eta"]) and _is_num(v["guidance"]),
        "buckets": lambda v: isinstance(v, list) and all(
            isinstance(b, dict) and isinstance(b.get("t_range"), list) and len(b["t_range"]) == 2
            and all(_is_num(t) for t in b["t_range"])
            and isinstance(b.get("steps", []), list) and all(_is_int(i) for i in b.get("steps", [])) for b in v),
    },
    "build": {"precisions": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)},
    "plan": {"plan": lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v)},
}


_STAGE_REQUIRED = {"calibrate": ("config",)}


def _stage_record_problem(name: str, rec: Any) -> str | None:
    if not isinstance(rec, dict):
        return f"is {type(rec).__name__}, not an object"
    missing = [f for f in _STAGE_REQUIRED.get(name, ()) if f not in rec]
    if missing:
        return f"has no {', '.join(missing)}"
    for field, ok in {**_STAGE_FIELDS["*"], **_STAGE_FIELDS.get(name, {})}.items():
        if field in rec and not ok(rec[field]):
            return f"field {field!r} is malformed ({str(rec[field])[:80]})"
    return None


def _manifest_id(root: Path) -> tuple[int, int] | None:
    """Identity of the manifest file: a commit replaces the whole directory, so this changes."""
    try:
        st = os.stat(root / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class Bundle:
    """A bundle opened for reading. Use :meth:`open`; files are verified on first access."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()
        self._manifest_id = _manifest_id(root)

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        root = Path(path)
        recover_if_idle(real_root(root))
        mpath = root / MANIFEST
        if root.exists() and not root.is_dir():
            raise BundleError(f"{root} is a file, not a bundle (a bundle is a directory with a {MANIFEST}, made by "
                              f"`ptqd export` or `ptqd compile`)")
        if not root.is_dir():
            raise BundleError(f"bundle not found: {root} (create one with `ptqd export MODEL --out {root}`)")
        if not mpath.is_file():
            raise BundleError(f"{root} is not a ptqd bundle: it has no {MANIFEST}")
        try:
            manifest = json.loads(mpath.read_text())
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise BundleError(f"{mpath} is not valid JSON ({str(e)[:200]}); the bundle is damaged, re-export it") \
                from None
        except OSError as e:
            raise BundleError(f"cannot read {mpath}: {e.strerror or e}") from None
        return cls(root, cls._migrate(manifest, mpath))

    @staticmethod
    def _migrate(m: Any, where: Path) -> dict[str, Any]:
        if not isinstance(m, dict) or "schema_version" not in m:
            raise BundleError(f"{where} has no schema_version: not a ptqd manifest")
        v = m["schema_version"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BundleError(f"{where}: schema_version {v!r} is not a positive integer")
        producer = m.get("producer", {})
        if v > SCHEMA_VERSION:
            version = producer.get("version") if isinstance(producer, dict) else None
            raise BundleError(
                f"bundle schema_version {v} is newer than this ptqd {__version__} understands "
                f"(up to {SCHEMA_VERSION}); it was written by ptqd {version if isinstance(version, str) else '?'}: "
                "upgrade ptqd to read it"
            )
        if not isinstance(producer, dict):
            raise BundleError(f"{where}: 'producer' must be an object like {{\"name\": \"ptqd\", \"version\": "
                              f"\"{__version__}\"}}, got {type(producer).__name__}; the manifest is damaged")
        files = m.get("files")
        if not isinstance(files, dict):
            raise BundleError(f"{where} has no 'files' table")
        for rel, rec in files.items():
            if check_relpath(rel) != rel or rel == ".":
                raise BundleError(f"{where}: manifest path {rel!r} is not in normal form; the manifest is damaged")
            if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str):
                raise BundleError(f"{where}: entry {rel!r} has no sha256")
            if not _SHA256.fullmatch(rec["sha256"]):
                raise BundleError(f"{where}: entry {rel!r}: sha256 {rec['sha256'][:80]!r} is not 64 hex digits")
            size = rec.get("size")
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_FILE_SIZE:
                raise BundleError(f"{where}: entry {rel!r}: size {size!r} is not a byte count (an integer from 0 "
                                  f"to {MAX_FILE_SIZE}); the manifest is damaged")
        for key in ("stages", "model"):
            if key in m and not isinstance(m[key], dict):
                raise BundleError(f"{where}: '{key}' must be an object, got {type(m[key]).__name__}; "
                                  "the manifest is damaged")
        for name, rec in m.get("stages", {}).items():
            problem = _stage_record_problem(name, rec)
            if problem:
                raise BundleError(f"{where}: stage record {name!r}: {problem}; the manifest is damaged (rerun that "
                                  "stage)")
        return m

    def _changed_since_open(self) -> bool:
        return _manifest_id(self.root) != self._manifest_id

    def digest(self) -> str:
        """sha256 of the manifest as read: equal digests, the same files (each is checked against it)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def check_digest(self, want: str) -> None:
        """Refuse a bundle that is no longer the one a run started on (a writer committed meanwhile)."""
        if self.digest() != want:
            raise BundleError(f"{self.root} was updated by another ptqd process while this run was reading it; "
                              "run the command again")

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
            packed = self.stage("pack")
            if packed:  # a deployable bundle (ptqd pack): say what it keeps and where the rest is
                keeps = packed.get("precisions", [])
                use = (["--plan auto"] if packed.get("plan") == "auto" else []) + [f"--plan {p}" for p in keeps]
                raise BundleError(f"{self.root} is a packed bundle ({', '.join(keeps)} on {packed.get('backend')}) "
                                  f"and has no {rel}: it samples with {' or '.join(use)}; run anything else on the "
                                  f"full bundle {packed.get('from')}")
            raise BundleError(f"{self.root} has no {rel!r} (listed: {', '.join(sorted(self.files)) or 'nothing'})")
        p = self.root / rel
        real_root = self.root.resolve()
        if real_root not in p.resolve().parents:
            raise BundleError(f"{rel!r} resolves outside the bundle (symlink?); refusing to use it")
        if verify and rel not in self._verified:
            if not p.is_file():
                if self._changed_since_open():
                    raise self._updated_meanwhile(rel)
                raise BundleError(f"{self.root}: {rel} is listed in the manifest but missing on disk")
            want = self.files[rel]
            size = p.stat().st_size
            digest = sha256_file(p) if size == want["size"] else None
            if digest != want["sha256"]:
                if self._changed_since_open():
                    raise self._updated_meanwhile(rel)
                got = f"sha256 {digest[:12]}..." if digest else f"{size} bytes"
                expected = f"{want['sha256'][:12]}..." if digest else f"{want['size']} bytes"
                raise BundleError(
                    f"{self.root}: {rel} does not match its checksum ({got}, manifest says {expected}): the file "
                    "was modified or damaged; rebuild that stage"
                )
            self._verified.add(rel)
        return p

    def _updated_meanwhile(self, rel: str) -> BundleError:
        return BundleError(f"{self.root} was updated by another ptqd process while this one was reading it "
                           f"({rel} changed); run the command again")

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
        root = real_root(path)  # a symlinked bundle: update the real directory, keep the link
        with bundle_lock(root, blocking=True, make_parent=True):
            recover(root)
            if root.exists() and not root.is_dir():
                raise BundleError(f"{root} exists and is not a directory")
            if root.exists() and not create and not (root / MANIFEST).exists():
                raise BundleError(f"{root} is not a ptqd bundle (no {MANIFEST})")
            if root.exists() and create and any(root.iterdir()) and not (root / MANIFEST).exists():
                raise BundleError(f"{root} exists, is not empty and is not a ptqd bundle; choose another --out")
            previous = None if create or not root.exists() else cls.open(root)
            listed = set(previous.files) if previous is not None else _listed_leniently(root) if create else None
            staging = root.parent / f".{root.name}{STAGING_MARK}{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                writer = BundleWriter(root, staging, previous)
                if listed is not None:
                    writer._foreign = _carry_foreign(root, staging, listed)
                yield writer
                writer._commit()
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise


def _listed_leniently(root: Path) -> set[str] | None:
    """The paths an existing (perhaps damaged) manifest lists; None when it cannot be read."""
    try:
        files = json.loads((root / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    return set(files) if isinstance(files, dict) else None


def _carry_foreign(src: Path, staging: Path, listed: set[str]) -> set[str]:
    """Carry what the user keeps inside the bundle (files the manifest does not list, symlinks, empty
    folders) into ``staging`` untouched: hard links, symlinks recreated as they are. Returns their paths."""
    carried: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(src):  # does not descend into symlinked folders
        here = Path(dirpath)
        rel_dir = here.relative_to(src)
        (staging / rel_dir).mkdir(parents=True, exist_ok=True)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            rel = (rel_dir / name).as_posix()
            if rel in listed or rel == MANIFEST:
                continue
            s, d = here / name, staging / rel
            if d.exists() or d.is_symlink():
                continue
            if s.is_symlink():
                os.symlink(os.readlink(s), d)
            else:
                try:
                    os.link(s, d)
                except OSError:
                    shutil.copy2(s, d)
            carried.add(rel)
    return carried


class BundleWriter:
    """Collects one stage's writes in a staging directory; ``_commit`` swaps it in."""

    def __init__(self, root: Path, staging: Path, previous: Bundle | None):
        self.root, self.staging = root, staging
        self.manifest: dict[str, Any] = (
            json.loads(json.dumps(previous.manifest)) if previous else
            {"schema_version": SCHEMA_VERSION, "created": _now(), "files": {}, "stages": {}}
        )
        self._dirty: set[str] = set()
        self._foreign: set[str] = set()  # the user's files, carried over as they are
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
        for parent in reversed(PurePosixPath(rel).parents[:-1]):  # a user's symlink where ptqd writes a folder
            q = self.staging / parent
            if q.is_symlink() or q.exists() and not q.is_dir():
                raise BundleError(f"{self.root}: ptqd writes {rel}, but {parent} in the bundle is not ptqd's folder "
                                  "(a symlink or a file); move it away and run the command again")
        p = self.staging / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
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
        ours = rel in self.manifest["files"] or rel in self._dirty
        self.manifest["files"].pop(rel, None)
        self._dirty.discard(rel)
        p = self.staging / rel
        if ours and p.exists():  # never a file the user keeps there
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
        known = set(self.manifest["files"]) | self._foreign
        for dirpath, dirnames, filenames in os.walk(self.staging):  # stray files (e.g. ORT side outputs)
            for name in filenames:                                   # must be listed or go
                rel = (Path(dirpath) / name).relative_to(self.staging).as_posix()
                if rel not in known and rel != MANIFEST:
                    raise RuntimeError(f"internal: {rel} was written to the bundle but never declared")
        self.manifest["schema_version"] = SCHEMA_VERSION
        self.manifest["producer"] = {"name": "ptqd", "version": __version__}
        self.manifest["updated"] = _now()
        _write_atomic(self.staging / MANIFEST, (json.dumps(self.manifest, indent=2) + "\n").encode())
        old = self.root.parent / f".{self.root.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
        if self.root.exists():
            os.rename(self.root, old)
        os.rename(self.staging, self.root)
        shutil.rmtree(old, ignore_errors=True)
