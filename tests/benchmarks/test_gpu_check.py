"""``benchmarks/gpu_check.py --dry-run``: every section runs on CPU and lands in the JSON file."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    # A budget no CPU run reaches: inductor compiles the compiled section (minutes on 2 cores).
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"]
    command += ["--budget-s", "3000", "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True)
    results = json.loads(out.read_text())
    sections = ("environment", "h2d", "step_eager", "syncs", "step_compiled", "loader", "decode")
    assert list(results) == ["dry_run", "budget_s", *sections]
    assert results["dry_run"] is True and results["budget_s"] == 3000.0
    timings = {name: results[name].pop("section_s") for name in sections}
    assert all(isinstance(s, float) and s >= 0.0 for s in timings.values())
    assert results["environment"] == {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "cpu_cores": os.cpu_count(),
        "device": "cpu",
    }
    h2d = results["h2d"]
    assert (h2d["bytes"], h2d["pinned"]) == (2**20, False) and math.isfinite(h2d["gb_per_s"])
    for name in ("step_eager", "step_compiled"):  # the compiled one: compile=True (inductor)
        assert list(results[name]) == ["2"], name  # the dry run's one batch size
        step = results[name]["2"]
        assert list(step) == ["samples_per_s", "gflop_per_sample", "mfu"]
        assert math.isfinite(step["samples_per_s"]) and step["mfu"] is None  # no GPU peak
        # Teacher forward, student forward and backward of the depth-1 TerraFM-Ti at 2 x 32 +
        # 2 x 16 crops, counted eagerly by FlopCounterMode.
        assert step["gflop_per_sample"] == pytest.approx(0.479129856, rel=1e-9)
    # Device work only: no profiler-visible host read in the measured steps.
    assert results["syncs"] == {"method": "torch.profiler (CPU)", "syncs_per_step": 0.0}
    loader = results["loader"]
    assert list(loader) == ["store", "workers_1"]
    assert {k: loader["store"][k] for k in ("samples", "tile")} == {"samples": 8, "tile": 64}
    assert loader["workers_1"]["batch_size"] == 2
    assert math.isfinite(loader["workers_1"]["samples_per_s"])
    # Skipped on CPU, naming the decode module it looked for (found or not in this tree).
    assert list(results["decode"]) == ["skipped"]
    assert results["decode"]["skipped"].startswith("terrafm_lightning.data.decode ")
