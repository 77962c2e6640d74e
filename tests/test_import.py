"""``import ptqd`` stays light: no onnxruntime, tensorrt (or torch) at package import time."""

import subprocess
import sys

HEAVY = ("onnxruntime", "tensorrt", "torch", "diffusers", "polygraphy")


def _imported_after(stmt: str) -> set[str]:
    code = f"import sys; {stmt}; print(' '.join(sorted(m for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {m.split(".")[0] for m in out}


def test_import_ptqd_is_light():
    mods = _imported_after("import ptqd")
    assert not mods & set(HEAVY), mods & set(HEAVY)


def test_bundle_facts_and_cli_parser_are_light():
    mods = _imported_after("import ptqd.bundle, ptqd.facts, ptqd.api, ptqd.cli; ptqd.cli.build_parser()")
    assert not mods & set(HEAVY), mods & set(HEAVY)
