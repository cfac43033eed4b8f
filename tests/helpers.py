"""Test helpers shared by all areas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from terrafm_lightning.data.store import Encoding
from terrafm_lightning.data.synthetic import prepare_synthetic


def make_synthetic_store(
    path: Path, n_samples: int = 32, tile_size: int = 64, seed: int = 0, samples_per_shard: int = 4
) -> Path:
    """Write a small synthetic store in-process (no dask; ~20 ms per 64 px tile) and return it."""
    prepare_synthetic(
        str(path),
        n_samples,
        tile_size,
        seed,
        encoding=Encoding(samples_per_shard=samples_per_shard),
        overwrite=True,
        scheduler="sync",
        progress=False,
    )
    return path


ROOT = Path(__file__).resolve().parents[1]


def run_rank_script(script: str, out: Path, devices: int) -> None:
    """Run ``tests/<script> OUT DEVICES`` in a fresh interpreter (it spawns the ranks itself)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / script), str(out), str(devices)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
