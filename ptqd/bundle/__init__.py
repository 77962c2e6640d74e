"""The bundle: ptqd's on-disk contract between stages (stdlib + numpy only).

``store``: manifest, atomic transactions, checksums, containment, versions. ``lock``: one writer at a
time and recovery of what a dead writer left. ``layout``: every path in a bundle and typed readers.
"""

from ptqd.bundle.lock import real_root, writer_lock, writes_bundle
from ptqd.bundle.store import MANIFEST, SCHEMA_VERSION, Bundle, BundleWriter, check_relpath, sha256_file

__all__ = ["Bundle", "BundleWriter", "MANIFEST", "SCHEMA_VERSION", "check_relpath", "real_root", "sha256_file",
           "writer_lock", "writes_bundle"]
