"""The dask + resume driver shared by every ``terrafm-data`` subcommand.

Work is split into per-shard groups of pending samples (a shard is written by one task only).
Tasks run on dask workers, catch per-tile failures into messages naming the file and tile, write
their pixel shards and return the per-sample metadata; the driver alone writes the metadata and
the resume marker (last). A killed run leaves the marker False for any tile not fully written,
so running the same command again redoes exactly those tiles.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import Any

import fsspec
import zarr
from tqdm import tqdm

from terrafm_lightning.store import format as st

FLUSH_SECONDS = 2.0
"""The driver writes buffered metadata at most this often (and at the end)."""


class PrepError(RuntimeError):
    """A prep run stopped on bad input or a failed worker; the message names file and tile."""


@dataclass
class TaskResult:
    """What one shard task returns: metadata of good samples and messages for bad ones."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)


@dataclass
class PrepReport:
    """Outcome of a run: samples done now, done before (resume), skipped as bad, and dropped."""

    done: int
    already_done: int
    skipped: dict[int, str]
    dropped: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the console."""
        line = f"{self.done} tiles written, {self.already_done} already done (resumed)"
        line += f", {len(self.skipped)} bad tiles skipped" if self.skipped else ""
        return line + (f", {len(self.dropped)} tiles dropped" if self.dropped else "")


def source_digest(plan: Any) -> str:
    """Stable digest of a JSON-able description of a run's inputs (resume must match it)."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()


def exists(path: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a store already exists at ``path``."""
    try:
        fs, root = fsspec.core.url_to_fs(path, **dict(storage_options or {}))
        return fs.exists(f"{root.rstrip('/')}/zarr.json")
    except Exception as err:
        raise st.StoreError(f"cannot reach store path {path}: {err}") from err


def create_or_resume(
    path: str,
    n_samples: int,
    tile_size: int,
    modalities: Sequence[str],
    plan: Any,
    encoding: st.Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Open the store of an interrupted run with the same inputs, or create a new one.

    Raises:
        StoreError: when ``path`` holds a store made from other inputs and not ``overwrite``.
    """
    digest = source_digest(plan)
    if not overwrite and exists(path, storage_options):
        root = st.open_store(path, mode="r+", storage_options=storage_options)
        if root.attrs.get("source_digest") != digest or root["written"].shape[0] != n_samples:
            raise st.StoreError(
                f"{path} holds a store made from different inputs or options; choose another "
                "output path or pass --overwrite"
            )
        return root
    return st.create_store(
        path,
        n_samples,
        tile_size,
        modalities,
        encoding,
        attributes={"source_digest": digest},
        storage_options=storage_options,
    )


def guarded(indices: Sequence[int], make: Callable[[int], Any]) -> tuple[dict[int, Any], dict]:
    """Apply ``make`` per sample, turning each failure into a message naming the sample."""
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    for i in indices:
        try:
            done[i] = make(i)
        except Exception as err:  # any decode/format failure becomes a per-tile report
            errors[i] = f"sample {i}: {type(err).__name__}: {err}"
    return done, errors


def sample_shard_task(
    path: str,
    storage_options: Mapping[str, Any] | None,
    make_sample: Callable[[int], st.Sample],
    indices: Sequence[int],
) -> TaskResult:
    """Build the samples of one shard, write their pixels and return their metadata."""
    samples, errors = guarded(indices, partial(_checked_sample, make_sample))
    if samples:
        root = st.open_store(path, mode="r+", storage_options=storage_options)
        ok = sorted(samples)
        st.write_pixels(root, ok, [samples[i] for i in ok])
        attrs = root.attrs.asdict()
        records = {i: st.sample_record(attrs, samples[i]) for i in ok}
        return TaskResult(records, errors)
    return TaskResult({}, errors)


def _checked_sample(make_sample: Callable[[int], st.Sample], index: int) -> st.Sample:
    """``make_sample(index)``, refusing a tile whose every modality is nodata."""
    sample = make_sample(index)
    if all(st.nodata_mask(m, p).all() for m, p in sample.pixels.items()):
        raise ValueError(f"tile {sample.grid_cell}/{sample.tile_index} is empty or all nodata")
    return sample


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int | None) -> Iterator[Any]:
    """``"sync"``: no dask (in process); ``"local"``: a LocalCluster; else a scheduler address."""
    if scheduler == "sync":
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler == "local":
        cluster = LocalCluster(
            n_workers=workers or os.cpu_count() or 1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        with cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as err:
        raise PrepError(f"cannot reach dask scheduler {scheduler}: {err}") from err
    with client:
        yield client


def run_shards(
    path: str,
    indices: Sequence[int],
    task: Callable[[Sequence[int]], TaskResult],
    *,
    marker: str = st.WRITTEN,
    scheduler: str = "local",
    workers: int | None = None,
    skip_bad: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    description: str = "tiles",
) -> PrepReport:
    """Run ``task`` over the shard groups of ``indices`` and record results in the store.

    Args:
        path: the store (already created).
        indices: the samples to do (normally :func:`store.pending`).
        task: picklable callable taking one shard's indices.
        marker: the resume flag set (last) for each finished sample.
        scheduler: ``"local"``, ``"sync"`` or a dask scheduler address.
        workers: LocalCluster worker processes (default: CPU count).
        skip_bad: skip (and count) bad tiles instead of stopping at the first one.
        storage_options: fsspec options for remote stores.
        progress: show a progress bar.
        description: progress bar label.

    Raises:
        PrepError: on a bad tile (without ``skip_bad``) or a failed dask task.
    """
    root = st.open_store(path, mode="r+", storage_options=storage_options)
    total = int(root[marker].shape[0])
    groups = st.shard_groups(root, indices)
    skipped = {int(k): v for k, v in root.attrs.get("skipped", {}).items()}
    buffer: dict[int, dict[str, Any]] = {}
    newly_skipped: dict[int, str] = {}
    done = 0
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        st.write_records(root, buffer, marker)
        for i in buffer:
            skipped.pop(i, None)
        skipped.update(newly_skipped)
        root.attrs["skipped"] = {str(k): v for k, v in sorted(skipped.items())}
        buffer.clear()
        last_flush = time.monotonic()

    with tqdm(total=len(indices), desc=description, unit="tile", disable=not progress) as bar:
        results = map_shards(groups, task, scheduler, workers)
        try:
            for group, result in results:
                buffer.update(result.records)
                done += len(result.records)
                bar.update(len(group))
                if result.errors and not skip_bad:
                    first = min(result.errors)
                    raise PrepError(
                        f"{result.errors[first]} (stopped; fix the input or pass --skip-bad)"
                    )
                newly_skipped.update(result.errors)
                if time.monotonic() - last_flush > FLUSH_SECONDS:
                    flush()
        finally:
            results.close()  # shuts the dask cluster down before the final metadata write
            flush()
            st.consolidate(path, storage_options)
    return PrepReport(done, total - len(indices), newly_skipped)


def map_shards(
    groups: list[list[int]],
    task: Callable[[Sequence[int]], TaskResult],
    scheduler: str,
    workers: int | None,
) -> Iterator[tuple[list[int], TaskResult]]:
    """Yield (group, result) as tasks finish, keeping a bounded number in flight."""
    with dask_client(scheduler, workers) as client:
        if client is None:
            for group in groups:
                yield group, task(group)
            return
        from distributed import as_completed

        window = 4 * max(len(client.scheduler_info()["workers"]), 1)
        pending_groups = iter(groups)
        owner: dict[Any, list[int]] = {}
        running = as_completed()
        for group in islice(pending_groups, window):
            future = client.submit(task, group, pure=False)
            owner[future] = group
            running.add(future)
        for future in running:
            group = owner.pop(future)
            try:
                result = future.result()
            except Exception as err:
                for other in owner:
                    other.cancel()
                raise PrepError(
                    f"dask task for samples {group[0]}..{group[-1]} failed: "
                    f"{type(err).__name__}: {err}"
                ) from None
            yield group, result
            following = next(pending_groups, None)
            if following is not None:
                future = client.submit(task, following, pure=False)
                owner[future] = following
                running.add(future)
