"""``terrafm-data stats``: exact per-band mean/std per modality, streamed over the store.

Each shard task reduces its written, available tiles to per-band (count, mean, M2) over valid
pixels in float64; the driver merges them with Chan's parallel formula, so the result equals a
two-pass computation over all valid pixels without holding them in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from terrafm_lightning.prep.driver import map_shards
from terrafm_lightning.prep.lock import store_lock
from terrafm_lightning.store.format import consolidate, open_store, shard_groups, store_modalities
from terrafm_lightning.store.schema import NODATA, WRITTEN

Moments = dict[str, np.ndarray]


def band_moments(pixels: np.ndarray, nodata: float) -> Moments:
    """Per-band count, mean and M2 of (sample, band, y, x) over valid pixels."""
    bands = np.moveaxis(pixels, 1, 0).reshape(pixels.shape[1], -1).astype(np.float64)
    valid = ~np.isnan(bands) if np.isnan(nodata) else bands != nodata
    count = valid.sum(axis=1).astype(np.float64)
    total = np.where(valid, bands, 0).sum(axis=1)
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    m2 = (np.where(valid, bands - mean[:, None], 0) ** 2).sum(axis=1)
    return {"count": count, "mean": mean, "m2": m2}


def merge(a: Moments, b: Moments) -> Moments:
    """Chan et al. pairwise merge of two moment sets."""
    count = a["count"] + b["count"]
    safe = np.where(count > 0, count, 1)
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * b["count"] / safe
    m2 = a["m2"] + b["m2"] + delta**2 * a["count"] * b["count"] / safe
    return {"count": count, "mean": mean, "m2": m2}


def stats_shard_task(
    path: str, storage_options: Mapping[str, Any] | None, indices: Sequence[int]
) -> dict[str, Moments]:
    """Moments per modality over the written, available tiles of one shard."""
    root = open_store(path, storage_options=storage_options)
    idx = np.asarray(indices)
    out = {}
    for k, m in enumerate(store_modalities(root)):
        use = idx[root["available"].get_orthogonal_selection((idx, k))]
        if len(use):
            pixels = root[m].get_orthogonal_selection((use, *(slice(None),) * 3))
            out[m] = band_moments(pixels, NODATA[m])
    return out


def compute_stats(
    path: str,
    storage_options: Mapping[str, Any] | None = None,
    scheduler: str = "local",
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Compute and store ``stats`` (mean, std, count, provenance) for every modality (public API).

    Args:
        path: an existing store.
        storage_options: fsspec options of the store.
        scheduler: ``"local"``, ``"sync"`` or a dask scheduler address.
        workers: LocalCluster worker processes (default: CPU count).
        progress: show a progress bar.
    """
    with store_lock(path, storage_options, existing=True):
        root = open_store(path, mode="r+", storage_options=storage_options)
        groups = shard_groups(root, np.flatnonzero(root[WRITTEN][:]))
        task = partial(stats_shard_task, path, storage_options)
        totals: dict[str, Moments] = {}
        for _, result in map_shards(groups, task, scheduler, workers, progress, "stats"):
            for m, moments in result.items():
                totals[m] = merge(totals[m], moments) if m in totals else moments
        stats = _summarise(totals, sum(len(g) for g in groups), root, path)
        root.attrs["stats"] = stats
        consolidate(path, storage_options)
    return stats


def _summarise(
    totals: Mapping[str, Moments], n: int, root: Any, path: str
) -> dict[str, dict[str, Any]]:
    """The ``stats`` attribute from merged moments of ``n`` tiles."""
    stats = {}
    for m, t in totals.items():
        std = np.sqrt(t["m2"] / np.maximum(t["count"], 1))
        stats[m] = {
            "mean": t["mean"].tolist(),
            "std": std.tolist(),
            "count": t["count"].astype(int).tolist(),
            "provenance": (
                f"terrafm-data stats: exact population mean/std over valid pixels of {n} "
                f"written tiles of {root.attrs.get('source', path)}; units: "
                f"{root.attrs['units'][m]}"
            ),
        }
    return stats
