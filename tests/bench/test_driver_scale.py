"""Smoke test of bench/driver_scale.py: `--quick` runs every section and prints its table
(no timing thresholds: the figures depend on the machine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_prints_its_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "bench/driver_scale.py", "--quick", "--keep", str(tmp_path / "w")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^\s+800\s+[\d,]+\s+[\d.,]+\s+\d+x$", out, re.M), out  # the ray.wait rows
    # every row of both jobs went through a shard task and failed as a missing file
    assert "job 2,000 rows: failed by reason: missing_file=2000" in out, out
    assert "job 20,000 rows: failed by reason: missing_file=20000" in out, out
    assert re.search(r"driver peak RSS growth 2,000 -> 20,000 rows: [+-][\d,]+ MB", out), out
    assert re.search(r"^\s+2,000,000\s+4\s+[\d.]+\s+[\d,]+", out, re.M), out  # the dry-run row
    assert "LAION-2B" in out and "videos       4      2000000" in out, out
