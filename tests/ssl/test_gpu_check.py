"""``benchmarks/gpu_check.py --dry-run``: every section runs on CPU and lands in the JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"]
    subprocess.run([*command, "--out", str(out)], check=True, env=env, capture_output=True)
    results = json.loads(out.read_text())
    sections = ("environment", "h2d", "step_eager", "syncs", "step_compiled", "loader", "decode")
    for name in sections:
        assert "error" not in results[name], (name, results[name])
    assert results["dry_run"] is True and results["environment"]["device"] == "cpu"
    assert results["h2d"]["gb_per_s"] > 0
    for name in ("step_eager", "step_compiled"):
        step = results[name]["2"]  # the dry run's one batch size
        assert step["samples_per_s"] > 0 and step["gflop_per_sample"] > 0
    assert results["syncs"]["syncs_per_step"] <= 2
    assert results["loader"]["workers_1"]["samples_per_s"] > 0
