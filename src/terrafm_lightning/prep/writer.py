"""The tile writer: the one tail every source (synthetic, geotiff, majortom) runs.

A source plans its inputs and gives a picklable ``make_sample(index) -> Sample``; the writer
takes the store's write lock, creates the store or resumes the interrupted run with the same
inputs, writes the pending tiles through the driver and refreshes the dataset attributes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import zarr

from terrafm_lightning.prep.driver import PrepReport, TaskResult, guarded, run_shards
from terrafm_lightning.prep.lock import store_lock
from terrafm_lightning.store.format import (
    StoreError,
    consolidate,
    create_store,
    exists,
    open_store,
    pending,
    update_class_frequencies,
)
from terrafm_lightning.store.records import Sample, sample_record, write_pixels
from terrafm_lightning.store.schema import WRITTEN, Encoding


def source_digest(plan: Any) -> str:
    """Stable digest of a JSON-able description of a run's inputs (resume must match it)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def create_or_resume(
    path: str,
    n_samples: int,
    tile_size: int,
    modalities: Sequence[str],
    plan: Any,
    encoding: Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Open the store of an interrupted run with the same inputs, or create a new one.

    Raises:
        StoreError: when ``path`` holds a store made from other inputs and not ``overwrite``.
    """
    digest = source_digest(plan)
    if not overwrite and exists(path, storage_options):
        root = open_store(path, mode="r+", storage_options=storage_options)
        if root.attrs.get("source_digest") != digest or root[WRITTEN].shape[0] != n_samples:
            raise StoreError(
                f"{path} holds a store made from different inputs or options; choose another "
                "output path or pass --overwrite"
            )
        return root
    return create_store(
        path,
        n_samples,
        tile_size,
        modalities,
        encoding,
        attributes={"source_digest": digest},
        storage_options=storage_options,
    )


def sample_shard_task(
    path: str,
    storage_options: Mapping[str, Any] | None,
    make_sample: Callable[[int], Sample],
    indices: Sequence[int],
) -> TaskResult:
    """Build the samples of one shard, write their pixels and return their metadata."""
    root = open_store(path, mode="r+", storage_options=storage_options)
    made, errors = guarded(indices, partial(_checked_sample, make_sample, root.attrs.asdict()))
    ok = sorted(made)
    if ok:
        write_pixels(root, ok, [made[i][0] for i in ok])
    return TaskResult({i: made[i][1] for i in ok}, errors)


def _checked_sample(
    make_sample: Callable[[int], Sample], attrs: Mapping[str, Any], index: int
) -> tuple[Sample, dict[str, Any]]:
    """``make_sample(index)`` and its record, refusing a tile whose every modality is nodata."""
    sample = make_sample(index)
    record = sample_record(attrs, sample)
    if not record["available"].any():
        raise ValueError(f"tile {sample.grid_cell}/{sample.tile_index} is empty or all nodata")
    return sample, record


def write_tiles(
    path: str,
    make_sample: Callable[[int], Sample],
    n_samples: int,
    tile_size: int,
    modalities: Sequence[str],
    plan: Any,
    source: str,
    *,
    encoding: Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **run_options: Any,
) -> PrepReport:
    """Write (or finish writing) the ``n_samples`` tiles ``make_sample`` builds into ``path``.

    Args:
        path: output store (local path or fsspec URL).
        make_sample: picklable function of the sample index.
        n_samples: number of tiles.
        tile_size: tile size in pixels.
        modalities: modalities that get an array (those with input).
        plan: JSON-able description of the inputs; a resume must match it.
        source: the ``source`` root attribute (how the store was made).
        encoding: store chunking/compression.
        overwrite: replace an existing store at ``path``.
        storage_options: fsspec options of the output store.
        **run_options: options of :func:`driver.run_shards` (scheduler, workers, skip_bad,
            progress).
    """
    with store_lock(path, storage_options) as lock:
        root = create_or_resume(
            path, n_samples, tile_size, modalities, plan, encoding, overwrite, storage_options
        )
        root.attrs["source"] = source
        task = partial(sample_shard_task, path, storage_options, make_sample)
        report = run_shards(root, pending(root), task, lock, **run_options)
        update_class_frequencies(path, storage_options)
        consolidate(path, storage_options)
    return report
