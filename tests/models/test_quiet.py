"""A log captured to a file carries ptqd's lines, not diffusers'/transformers' warnings and bars."""

import subprocess
import sys
from pathlib import Path


def test_export_log_to_a_file_has_no_library_chatter(tmp_path):
    from ptqd.models.tiny_sd import write_tiny_sd_pipeline

    model = write_tiny_sd_pipeline(tmp_path / "tiny-sd")
    log = tmp_path / "export.log"
    cli = [sys.executable, "-m", "ptqd.cli"]
    with open(log, "w") as f:
        r = subprocess.run([*cli, "export", str(model), "--out", str(tmp_path / "sd.bundle")], stdout=f,
                           stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2])
    text = log.read_text()
    assert r.returncode == 0, text
    assert "exported" in text
    for chatter in ("accelerate", "Loading weights", "low_cpu_mem_usage", "Warning", "it/s]"):
        assert chatter not in text, text
    with open(log, "w") as f:  # --debug keeps them
        subprocess.run([*cli, "--debug", "export", str(model), "--out", str(tmp_path / "sd.bundle")], stdout=f,
                       stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[2], check=True)
    assert "accelerate" in log.read_text()
