"""The bundle contract: checksums, containment, versioning, atomic updates."""

import os

import pytest

from ptqd.bundle import MANIFEST, Bundle, check_relpath
from ptqd.errors import BundleError


from tests.conftest import edit_manifest as _edit_manifest  # noqa: E402
from tests.conftest import make_bundle as _make  # noqa: E402


def test_roundtrip_and_checksums(tmp_path):
    b = _make(tmp_path / "b")
    assert b.read_bytes("a/data.bin") == b"v1" and b.read_json("info.json") == {"x": 1}
    assert len(b.files["a/data.bin"]["sha256"]) == 64 and b.stage("test") == {"n": 1}
    assert not list(tmp_path.glob(".b.staging-*")) + list(tmp_path.glob(".b.old-*")), "staging left behind"


def test_tampered_file_is_refused(tmp_path):
    _make(tmp_path / "b")
    (tmp_path / "b" / "a" / "data.bin").write_bytes(b"v2")
    with pytest.raises(BundleError, match="does not match its checksum"):
        Bundle.open(tmp_path / "b").read_bytes("a/data.bin")


@pytest.mark.parametrize("bad", ["../outside.bin", "/etc/passwd", "a/../../x", "C:/x", "a\\b"])
def test_paths_escaping_the_bundle_are_refused(tmp_path, bad):
    _make(tmp_path / "b")
    _edit_manifest(tmp_path / "b", lambda m: m["files"].__setitem__(bad, {"sha256": "0" * 64, "size": 1}))
    with pytest.raises(BundleError, match="escapes the bundle|not a relative POSIX path"):
        Bundle.open(tmp_path / "b")


def test_symlink_out_of_bundle_is_refused(tmp_path):
    b = _make(tmp_path / "b")
    (tmp_path / "secret").write_bytes(b"v1")
    target = tmp_path / "b" / "a" / "data.bin"
    target.unlink()
    os.symlink(tmp_path / "secret", target)
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.open(b.root).path("a/data.bin")


@pytest.mark.parametrize("version,match", [(2, "newer than this ptqd"), ("1", "not a positive integer"), (0, "positive")])
def test_unknown_schema_version(tmp_path, version, match):
    _make(tmp_path / "b")
    _edit_manifest(tmp_path / "b", lambda m: m.__setitem__("schema_version", version))
    with pytest.raises(BundleError, match=match):
        Bundle.open(tmp_path / "b")


def test_failed_stage_leaves_previous_bundle_intact(tmp_path):
    b = _make(tmp_path / "b")
    before = (tmp_path / "b" / MANIFEST).read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with Bundle.transaction(b.root) as w:
            w.write_bytes("a/data.bin", b"half-written")
            w.write_bytes("new.bin", b"new")
            raise RuntimeError("boom")
    again = Bundle.open(b.root)
    assert again.read_bytes("a/data.bin") == b"v1" and not again.has("new.bin")
    assert (tmp_path / "b" / MANIFEST).read_text() == before
    assert not list(tmp_path.glob(".b.staging-*"))


def test_update_keeps_unchanged_files_and_never_writes_through_links(tmp_path):
    b = _make(tmp_path / "b")
    old_inode = os.stat(b.path("a/data.bin")).st_ino
    with Bundle.transaction(b.root) as w:
        w.write_bytes("a/data.bin", b"v2")
        w.write_bytes("more.bin", b"m")
    nb = Bundle.open(b.root)
    assert nb.read_bytes("a/data.bin") == b"v2" and nb.read_bytes("more.bin") == b"m"
    assert nb.read_json("info.json") == {"x": 1}
    assert os.stat(nb.path("a/data.bin")).st_ino != old_inode


def test_interrupted_swap_is_recovered(tmp_path):
    _make(tmp_path / "b")
    os.rename(tmp_path / "b", tmp_path / ".b.old-deadbeef")  # died between the two renames
    (tmp_path / ".b.staging-cafe").mkdir()
    b = Bundle.open(tmp_path / "b")
    assert b.read_bytes("a/data.bin") == b"v1"
    assert not list(tmp_path.glob(".b.staging-*")) + list(tmp_path.glob(".b.old-*"))


def test_reader_never_cleans_up_a_live_writers_staging(tmp_path):
    _make(tmp_path / "b")
    with Bundle.transaction(tmp_path / "b") as w:
        w.write_bytes("late.bin", b"x")
        assert Bundle.open(tmp_path / "b").read_bytes("a/data.bin") == b"v1"  # a reader meanwhile
        assert w.staging.exists()
    assert Bundle.open(tmp_path / "b").read_bytes("late.bin") == b"x"


def test_create_refuses_to_clobber_a_non_bundle(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "thesis.tex").write_text("precious")
    with pytest.raises(BundleError, match="not a ptqd bundle"):
        with Bundle.transaction(tmp_path / "docs", create=True):
            pass
    assert (tmp_path / "docs" / "thesis.tex").read_text() == "precious"


def test_missing_listed_file(tmp_path):
    b = _make(tmp_path / "b")
    (tmp_path / "b" / "info.json").unlink()
    with pytest.raises(BundleError, match="missing on disk"):
        Bundle.open(b.root).verify_all()


def test_relpath_normalizes():
    assert check_relpath("engines/onnxruntime/w8a8.onnx") == "engines/onnxruntime/w8a8.onnx"
    with pytest.raises(BundleError):
        check_relpath("")
