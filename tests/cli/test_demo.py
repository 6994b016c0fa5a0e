"""The README's main job: `mineru-vram demo`, for real, in a subprocess, offline on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_parses_a_generated_pdf_and_prints_a_clean_receipt(random_models_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MINERU_VRAM_DEVICE": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "mineru_vram", "demo", "--models-dir", str(random_models_dir), "-o", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "[3/3] release receipt" in out
    receipt = out.split("[3/3] release receipt", 1)[1]
    assert "models released, 0 alive" in receipt
    # The demo explains what it printed: noise from random weights, the receipt's fields (on a CPU,
    # why there are no memory figures), the total time and the next step with real models.
    assert "random weights" in out.split("[3/3]")[0]
    assert "- models released:" in receipt
    assert "no memory figures: this run used the CPU" in receipt
    assert "- ok: yes" in receipt
    assert "done in " in receipt
    assert "mineru-vram models download" in receipt
    assert (tmp_path / "demo.md").is_file()
