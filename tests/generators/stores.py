"""Small stores written in-process for tests."""

from __future__ import annotations

from pathlib import Path

from terrafm_lightning.prep.sources.synthetic import prepare_synthetic
from terrafm_lightning.store.format import Encoding


def make_synthetic_store(
    path: Path,
    n_samples: int = 32,
    tile_size: int = 64,
    seed: int = 0,
    samples_per_shard: int = 4,
    codec: str = "blosc",
) -> Path:
    """Write a small synthetic store in-process (no dask; ~20 ms per 64 px tile) and return it."""
    prepare_synthetic(
        str(path),
        n_samples,
        tile_size,
        seed,
        encoding=Encoding(samples_per_shard=samples_per_shard, codec=codec),
        overwrite=True,
        scheduler="sync",
        progress=False,
    )
    return path
