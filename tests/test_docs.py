"""The front door stays short and every relative link in README and docs/ resolves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def pages():
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
    assert len(pages()) >= 10


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in (ROOT / "docs").glob("*.md") if f"docs/{p.name}" not in readme]
    assert not missing, missing


def test_speed_chart_draws_every_engine_from_the_benchmark_json(tmp_path):
    import json
    import subprocess
    import sys

    engines = ("ort-fp32", "ort-int8", "w8a8", "w4a8-openvino", "ov-nncf-int8")
    res = {"size": "mid", "threads": 2, "runs": 3, "machine": "test CPU",
           "batches": {str(b): {k: {"vs_ort_fp32": 1.0 + i / 2} for i, k in enumerate(engines)} for b in (1, 2)}}
    (tmp_path / "speed_mid.json").write_text(json.dumps(res))
    out = tmp_path / "speed.png"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_chart.py"), str(tmp_path / "speed_mid.json"),
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
