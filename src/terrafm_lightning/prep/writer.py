"""The tile writer: the one tail every source (synthetic, geotiff, majortom) runs.

A source plans its inputs and gives a picklable ``make_sample(index) -> Sample``; the writer
takes the store's write lock, creates the store or resumes the interrupted run with the same
inputs, writes the pending tiles through the driver and refreshes the dataset attributes.

A tile where some input modality has no valid pixel (:mod:`terrafm_lightning.prep.gaps`) is an
error naming the input and the reason, or, with ``keep_partial``, is written with that modality
unavailable and the reason in its ``skip_reason``; the run's notes count such tiles by reason.
The writer replaces only terrafm stores: any other Zarr store or non-empty folder at the output
is refused, ``overwrite`` or not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import fsspec
import zarr

from terrafm_lightning.prep.driver import LISTED, PrepReport, TaskResult, guarded, run_shards
from terrafm_lightning.prep.gaps import NONE_IN_TILE, GapExplainer
from terrafm_lightning.prep.lock import store_lock
from terrafm_lightning.store.format import (
    StoreError,
    consolidate,
    create_store,
    open_store,
    pending,
    update_class_frequencies,
)
from terrafm_lightning.store.records import Sample, sample_record, write_pixels
from terrafm_lightning.store.schema import SKIP_REASON, WRITTEN, Encoding


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
        StoreError: when ``path`` holds a store made from other inputs and not ``overwrite``,
            or anything that is not a terrafm store (overwrite or not).
    """
    digest = source_digest(plan)
    is_store = refuse_foreign_output(path, storage_options)
    if not overwrite and is_store:
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


def refuse_foreign_output(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether a terrafm store is at ``path``; raise when anything else is there.

    Creating a store clears its folder, so only terrafm stores (root attribute
    ``format_version``), empty folders or nothing may be at the output.

    Raises:
        StoreError: naming ``path`` when it holds another Zarr store or other files.
    """
    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        root = root.rstrip("/")
        metadata = fs.cat_file(f"{root}/zarr.json") if fs.isfile(f"{root}/zarr.json") else None
        foreign = metadata is None and (fs.isfile(root) or (fs.isdir(root) and bool(fs.ls(root))))
    except Exception as err:
        raise StoreError(f"cannot open store at {path}: unreachable: {err}") from err
    if metadata is not None:
        try:
            attrs = json.loads(metadata).get("attributes", {})
        except ValueError as err:
            raise StoreError(f"cannot open store at {path}: bad zarr.json: {err}") from err
        if "format_version" in attrs and "modalities" in attrs:
            return True
        raise StoreError(
            f"{path} is a Zarr store made by another tool, not a terrafm store; it is left "
            "untouched: choose another output path"
        )
    if foreign:
        raise StoreError(
            f"{path} exists and is not a terrafm store (no zarr.json); it is left untouched: "
            "choose another output path"
        )
    return False


def sample_shard_task(
    path: str,
    storage_options: Mapping[str, Any] | None,
    make_sample: Callable[[int], Sample],
    explain_gap: GapExplainer | None,
    keep_partial: bool,
    indices: Sequence[int],
) -> TaskResult:
    """Build the samples of one shard, write their pixels and return their metadata.

    A sample with an input modality without valid pixel is an error, or, with ``keep_partial``,
    written with the reason in its ``skip_reason``; ``counts`` counts them by reason.
    """
    root = open_store(path, mode="r+", storage_options=storage_options)
    attrs = root.attrs.asdict()
    made, errors = guarded(indices, partial(_checked_sample, make_sample, explain_gap, attrs))
    result = TaskResult(errors=errors)
    for i, (sample, record, gaps) in sorted(made.items()):
        if gaps:
            result.counts.update(f"{m} {reason}" for m, (reason, _) in gaps.items())
            where = f"tile {sample.grid_cell}/{sample.tile_index}: " + "; ".join(
                f"{m} input {name} {reason}" for m, (reason, name) in gaps.items()
            )
            if not keep_partial:
                result.errors[i] = (
                    f"sample {i}: {where}; pass --keep-partial to keep such tiles without it"
                )
                continue
            record[SKIP_REASON] = result.partial[i] = f"kept partial: {where}"
        result.records[i] = record
    ok = sorted(result.records)
    if ok:
        write_pixels(root, ok, [made[i][0] for i in ok])
    return result


def _checked_sample(
    make_sample: Callable[[int], Sample],
    explain_gap: GapExplainer | None,
    attrs: Mapping[str, Any],
    index: int,
) -> tuple[Sample, dict[str, Any], dict[str, tuple[str, str]]]:
    """``make_sample(index)``, its record and modality -> (reason, input) of its empty inputs.

    Raises:
        ValueError: for a tile whose every modality is nodata.
    """
    sample = make_sample(index)
    record = sample_record(attrs, sample)
    if not record["available"].any():
        raise ValueError(f"tile {sample.grid_cell}/{sample.tile_index} is empty or all nodata")
    empty = [
        m
        for m, ok in zip(attrs["modalities"], record["available"], strict=True)
        if m in sample.pixels and not ok
    ]
    explain = explain_gap or (lambda _i, _m: (NONE_IN_TILE, "input"))
    return sample, record, {m: explain(index, m) for m in empty}


def partial_notes(report: PrepReport, keep_partial: bool) -> list[str]:
    """Console lines on tiles with an input modality without valid pixel: counts, first named."""
    if not report.counts:
        return []
    action = "kept, --keep-partial" if keep_partial else "not written"
    reasons = ", ".join(f"{n} {key}" for key, n in sorted(report.counts.items()))
    notes = [f"tiles with an input modality without valid pixel ({action}): {reasons}"]
    shown = sorted(report.partial)[:LISTED]
    notes += [f"  sample {i}: {report.partial[i]}" for i in shown]
    if len(report.partial) > LISTED:
        notes.append(f"  ... and {len(report.partial) - LISTED} more (array skip_reason)")
    return notes


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
    explain_gap: GapExplainer | None = None,
    keep_partial: bool = False,
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
        explain_gap: picklable (index, modality) -> (reason, input name) of the source, for
            tiles where an input modality has no valid pixel (default: a generic reason).
        keep_partial: write such tiles without that modality instead of refusing them.
        **run_options: options of :func:`driver.run_shards` (scheduler, workers, skip_bad,
            progress).
    """
    with store_lock(path, storage_options) as lock:
        root = create_or_resume(
            path, n_samples, tile_size, modalities, plan, encoding, overwrite, storage_options
        )
        root.attrs["source"] = source
        task = partial(
            sample_shard_task, path, storage_options, make_sample, explain_gap, keep_partial
        )
        report = run_shards(root, pending(root), task, lock, **run_options)
        report.notes += partial_notes(report, keep_partial)
        update_class_frequencies(path, storage_options)
        consolidate(path, storage_options)
    return report
