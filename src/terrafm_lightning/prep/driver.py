"""The dask + resume driver shared by every ``terrafm-data`` subcommand.

Work is split into per-shard groups of samples (a shard is written by one task only). Tasks run
on dask workers, catch per-tile failures into messages naming the file and tile, write their
pixel shards and return the per-sample metadata. This module alone writes the bookkeeping: the
metadata, the resume marker (last), ``skip_reason`` and ``dropped``. A killed run leaves the
marker False for any tile not fully written, so running the same command again redoes exactly
those tiles. Flushes touch only the metadata chunks of the samples they write, so their cost does
not grow with the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from terrafm_lightning.prep.errors import InputError, PrepError
from terrafm_lightning.prep.lock import STALE_SECONDS, StoreLock
from terrafm_lightning.store.format import shard_groups
from terrafm_lightning.store.records import write_column, write_records
from terrafm_lightning.store.schema import DROPPED, SKIP_REASON, WRITTEN

FLUSH_SECONDS = 2.0
"""The driver writes buffered metadata at most this often (and at the end)."""
FLUSH_SHARE = 0.02
"""Most of the driver's time spent flushing: a flush costs a constant ~0.17 s (read-modify-write
of one chunk per metadata array, whatever the store size, measured at 200k samples), so the next
flush waits at least 50 times the last one's duration (~8 s). A killed run redoes at most that
much finished work."""
LISTED = 20
"""Tiles listed by name per kind of console note (the rest are counted)."""


@dataclass
class TaskResult:
    """What one shard task returns: metadata of good samples, messages for bad ones, counters.

    ``partial``: index -> message of the written samples kept partial (``--keep-partial``).
    """

    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    partial: dict[int, str] = field(default_factory=dict)


@dataclass
class PrepReport:
    """Outcome of a run.

    Attributes:
        done: samples finished by this run.
        already_done: samples finished before (resume).
        skipped: index -> message of bad tiles skipped (``--skip-bad``).
        dropped: indices dropped on purpose (``worldcover --drop-water-above``).
        restored: previously dropped indices made readable again by this run.
        counts: named counters of the run's tasks (for example tiles per WorldCover map, or
            partial tiles per reason).
        notes: lines the console prints after the summary (unpaired files, coverage).
        partial: index -> message of tiles written without some input modality
            (``--keep-partial``).
    """

    done: int
    already_done: int
    skipped: dict[int, str] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    restored: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    partial: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the console (resume is mentioned only when it happened)."""
        line = f"{self.done} tiles written"
        line += f", {self.already_done} already done (resumed)" if self.already_done else ""
        line += f", {len(self.partial)} kept partial" if self.partial else ""
        line += f", {len(self.skipped)} bad tiles skipped" if self.skipped else ""
        line += f", {len(self.restored)} dropped tiles restored" if self.restored else ""
        return line + (f", {len(self.dropped)} tiles dropped" if self.dropped else "")


def guarded(indices: Sequence[int], make: Callable[[int], Any]) -> tuple[dict[int, Any], dict]:
    """Apply ``make`` per sample, turning each failure into a message naming the sample.

    Input errors name their file already; other exceptions keep their type in the message.
    """
    done: dict[int, Any] = {}
    errors: dict[int, str] = {}
    for i in indices:
        try:
            done[i] = make(i)
        except InputError as err:
            errors[i] = f"sample {i}: {err}"
        except Exception as err:  # any decode/format failure becomes a per-tile report
            errors[i] = f"sample {i}: {type(err).__name__}: {err}"
    return done, errors


@contextlib.contextmanager
def dask_client(scheduler: str, workers: int | None) -> Iterator[Any]:
    """``"sync"``: no dask (in process); ``"local"``: a LocalCluster; else a scheduler address."""
    if scheduler == "sync":
        yield None
        return
    from distributed import Client

    if scheduler == "local":
        with local_cluster(workers or os.cpu_count() or 1) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="20s")
    except OSError as err:
        raise PrepError(f"cannot reach dask scheduler {scheduler}: {err}") from err
    with client:
        yield client


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while the block starts processes: they inherit it and never see Ctrl-C.

    An ignored signal stays ignored across fork and exec, and Python then installs no
    KeyboardInterrupt handler; the driver stops its workers itself. A Ctrl-C pressed inside the
    block (the cluster start) is lost. A no-op off the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def local_cluster(workers: int) -> Any:
    """A ``LocalCluster`` of ``workers`` single-threaded processes for prep tasks.

    The workers never see Ctrl-C (:func:`sigint_ignored`): the driver stops them, and the
    terminal shows the driver's one line instead of a traceback per worker.

    dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which turns off glibc's adaptive
    mmap threshold: every tile-sized buffer is then handed back to the OS when freed and
    page-faulted in again when the next is made. Measured on this workload: 1.6x slower per
    worker (16 tiles of 534 px, 4.4-4.9 s against 2.7-3.1 s), so these workers keep the default.
    """
    import dask
    from distributed import LocalCluster

    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
        sigint_ignored(),
    ):
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            # The scheduler's HTTP routes (served without the dashboard) bind a free port: the
            # default 8787, taken by another cluster, printed a warning on the console.
            scheduler_kwargs={"dashboard_address": ":0"},
            silence_logs=logging.ERROR,
        )


def run_shards(
    root: zarr.Group,
    indices: Sequence[int],
    task: Callable[[Sequence[int]], TaskResult],
    lock: StoreLock,
    *,
    marker: str = WRITTEN,
    scheduler: str = "local",
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    description: str = "tiles",
) -> PrepReport:
    """Run ``task`` over the shard groups of ``indices`` and record results in the store.

    Args:
        root: the store, opened for writing by the caller holding ``lock``.
        indices: the samples to do (normally :func:`store.format.pending`).
        task: picklable callable taking one shard's indices.
        lock: the store's write lock (its heartbeat is refreshed at every flush).
        marker: the resume flag set (last) for each finished sample.
        scheduler: ``"local"``, ``"sync"`` or a dask scheduler address.
        workers: LocalCluster worker processes (default: CPU count).
        skip_bad: skip (and count) bad tiles instead of stopping at the first one.
        progress: show a progress bar.
        description: progress bar label.

    Raises:
        PrepError: on a bad tile (without ``skip_bad``) or a failed dask task.
    """
    total = int(root[marker].shape[0])
    buffer: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    report = PrepReport(0, total - len(indices))
    last_flush, interval = time.monotonic(), FLUSH_SECONDS

    def flush() -> None:
        nonlocal last_flush, interval
        start = time.monotonic()
        flush_records(root, buffer, errors, marker)
        buffer.clear()
        errors.clear()
        lock.beat()
        last_flush = time.monotonic()
        # Capped well below the lock's staleness: the flush also refreshes the heartbeat.
        interval = min(max(FLUSH_SECONDS, (last_flush - start) / FLUSH_SHARE), STALE_SECONDS / 4)

    results = map_shards(
        shard_groups(root, indices), task, scheduler, workers, progress, description
    )
    try:
        for _, result in results:
            buffer.update(result.records)
            report.done += len(result.records)
            report.counts.update(result.counts)
            report.partial.update(result.partial)
            if result.errors and not skip_bad:
                first = min(result.errors)
                raise PrepError(
                    f"{result.errors[first]} (stopped; fix the input or pass --skip-bad)"
                )
            errors.update(result.errors)
            report.skipped.update(result.errors)
            if time.monotonic() - last_flush > interval:
                flush()
    finally:
        results.close()  # shuts the dask cluster down before the final metadata write
        flush()
    return report


def flush_records(
    root: zarr.Group,
    records: Mapping[int, Mapping[str, Any]],
    errors: Mapping[int, str],
    marker: str = WRITTEN,
) -> None:
    """Write finished samples (metadata, ``skip_reason``, then ``marker``) and failures.

    A finished sample's ``skip_reason`` is cleared unless its record sets one (a tile kept
    partial). Touches only the metadata chunks holding these samples: the cost does not grow with
    the store.
    """
    write_records(root, {i: {SKIP_REASON: "", **r} for i, r in records.items()}, marker)
    if errors:
        idx = np.array(sorted(errors))
        write_column(root, SKIP_REASON, idx, np.array([errors[i] for i in idx]))


def set_dropped(root: zarr.Group, drop: np.ndarray) -> tuple[list[int], list[int]]:
    """Make ``dropped`` equal ``drop`` (a (N,) bool mask), keeping ``written`` in step.

    A dropped tile keeps its pixels and gets ``written`` False (readers skip it); a tile dropped
    before and not now gets ``written`` True again, so a rerun with other settings recomputes
    the drops and nothing dropped is lost. Returns (newly dropped, restored) indices.
    """
    before = root[DROPPED][:]
    written = root[WRITTEN][:]
    restored = np.flatnonzero(before & ~drop)
    dropped = np.flatnonzero(drop & ~before)
    root[DROPPED][:] = drop
    root[WRITTEN][:] = (written | before) & ~drop
    return dropped.tolist(), restored.tolist()


def map_shards(
    groups: list[list[int]],
    task: Callable[[Sequence[int]], Any],
    scheduler: str,
    workers: int | None,
    progress: bool = True,
    description: str = "tiles",
) -> Iterator[tuple[list[int], Any]]:
    """Yield (group, result) as tasks finish, with a progress bar over the groups' samples.

    A bounded number of tasks is in flight; a failed task cancels the others.
    """
    total = sum(len(g) for g in groups)
    with (
        tqdm(total=total, desc=description, unit="tile", disable=not progress) as bar,
        dask_client(scheduler, workers) as client,
    ):
        if client is None:
            for group in groups:
                result = task(group)
                bar.update(len(group))
                yield group, result
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
            bar.update(len(group))
            yield group, result
            following = next(pending_groups, None)
            if following is not None:
                future = client.submit(task, following, pure=False)
                owner[future] = following
                running.add(future)
