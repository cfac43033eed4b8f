"""Map-style dataset of whole store tiles, read with zarr directly inside each worker."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset
from zarr.core.sync import sync

from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.store.format import WRITTEN, StoreError, open_store

MAJOR_TOM_NODATA = -32768
"""Major-TOM's S1 nodata value; with NaN/inf (float) and 0 (integer S2 DN) the nodata values.
0 is not nodata in float arrays: 0 dB is a valid S1 value."""


class TileReadError(StoreError):
    """A tile could not be read or holds no usable modality (the message names store and sample)."""


def invalid_values(pixels: np.ndarray) -> np.ndarray:
    """Boolean mask (same shape) of nodata values: NaN/inf, -32768, and 0 for integer arrays."""
    if pixels.dtype.kind == "f":
        return ~np.isfinite(pixels) | (pixels == MAJOR_TOM_NODATA)
    if pixels.dtype.kind == "i":
        return (pixels == 0) | (pixels == MAJOR_TOM_NODATA)
    return pixels == 0


def _all_valid(pixels: np.ndarray) -> bool:
    """True when a float tile has no nodata: two fast reductions instead of a masked scan.

    NaN propagates through ``min``, and infinities or -32768 show in the extremes.
    """
    low, high = pixels.min(), pixels.max()
    return bool(np.isfinite(low) and np.isfinite(high) and low > MAJOR_TOM_NODATA)


class SampleMetadata:
    """Per-sample metadata a reader needs, in :data:`MODALITIES` column order.

    Attributes:
        written: (N,) the sample is completely written.
        available: (N, 3) the store has the modality for the sample.
        nodata_fraction: (N, 3) share of nodata pixels (1 where absent).
        worldcover_hist: (N, 11) WorldCover class shares.
        dominant_class: (N,) dominant WorldCover code (0: none).
    """

    def __init__(self, root: zarr.Group) -> None:
        columns = [MODALITIES.index(m) for m in root.attrs["modalities"]]
        n = root[WRITTEN].shape[0]
        self.written = root[WRITTEN][:].astype(bool)
        self.available = np.zeros((n, len(MODALITIES)), bool)
        self.available[:, columns] = root["available"][:]
        self.nodata_fraction = np.ones((n, len(MODALITIES)), np.float32)
        self.nodata_fraction[:, columns] = root["nodata_fraction"][:]
        self.worldcover_hist = root["worldcover_hist"][:].astype(np.float32)
        self.dominant_class = root["dominant_class"][:].astype(np.int64)

    def usable(self, modalities: Sequence[str], nodata_threshold: float) -> np.ndarray:
        """(N, 3) the sample has the modality, it is selected and its nodata share is low enough."""
        selected = np.array([m in modalities for m in MODALITIES])
        return self.available & (self.nodata_fraction <= nodata_threshold) & selected


class StoreTileDataset(Dataset):
    """Whole tiles of the selected modalities, as the CPU batch of ``docs/contracts.md``.

    The store is opened on first access in the process that reads (each DataLoader worker), never
    pickled. Tiles keep the store dtype (S1 float32, S2 uint16: half the bytes of float32 through
    worker IPC and host-to-device copies; :class:`MultiCrop` converts on the device). Nodata
    values (NaN, inf, -32768; 0 in integer arrays) become 0; a modality whose nodata pixel share
    (a pixel is nodata when any band is) exceeds ``nodata_threshold`` counts as absent and its
    rows are all 0. Float tiles are scanned at read time; unsigned S2 tiles are not (their nodata
    is 0 already and the store's ``nodata_fraction`` already decided ``usable``). The modalities
    of a tile are read concurrently (see :meth:`_read`); pixels reach torch without a copy.

    Args:
        path: local store path or fsspec URL.
        samples: store sample indices this dataset serves.
        usable: (len(samples), 3) modalities to read per sample (see :meth:`SampleMetadata.usable`).
        worldcover_hist: (len(samples), 11) class shares.
        dominant_class: (len(samples),) dominant WorldCover codes.
        modalities: modalities to return (a key per modality, zeros where absent).
        nodata_threshold: the largest nodata pixel share a usable modality may have.
        storage_options: fsspec options for remote stores.
    """

    def __init__(
        self,
        path: str,
        samples: np.ndarray,
        usable: np.ndarray,
        worldcover_hist: np.ndarray,
        dominant_class: np.ndarray,
        modalities: Sequence[str],
        nodata_threshold: float = 0.5,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.samples = np.asarray(samples, np.int64)
        self.usable = np.asarray(usable, bool)
        self.worldcover_hist = np.asarray(worldcover_hist, np.float32)
        self.dominant_class = np.asarray(dominant_class, np.int64)
        self.modalities = [m for m in MODALITIES if m in set(modalities)]
        self.nodata_threshold = nodata_threshold
        self.storage_options = dict(storage_options or {})
        self.tile_size: int | None = None
        self._arrays: dict[str, zarr.Array] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, Any]:
        # Workers open their own handles; an open zarr group never crosses a process boundary.
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> dict[str, zarr.Array]:
        if self._arrays is None:
            root = open_store(self.path, storage_options=self.storage_options)
            missing = [m for m in self.modalities if m not in root.attrs["modalities"]]
            if missing:
                raise StoreError(f"store {self.path} has no modality {missing}")
            self.tile_size = int(root.attrs["tile_size"])
            self._arrays = {m: root[m] for m in self.modalities}
        return self._arrays

    def _read(self, index: int, modalities: Sequence[str]) -> dict[str, np.ndarray]:
        """Whole-tile pixels of ``modalities`` for store sample ``index``.

        One round trip to zarr's event loop for all modalities (``asyncio.gather`` over the async
        arrays, the batching zarr documents for ``Array.async_array``): their shard reads and
        decodes overlap instead of three blocking calls one after the other.
        """
        arrays = self._open()

        async def read_all() -> list[Any]:
            reads = (arrays[m].async_array.getitem(index) for m in modalities)
            return await asyncio.gather(*reads, return_exceptions=True)

        tiles = dict(zip(modalities, sync(read_all()), strict=True))
        for m, tile in tiles.items():
            if isinstance(tile, BaseException):
                raise TileReadError(
                    f"store {self.path}: cannot read {m} of sample {index}: "
                    f"{type(tile).__name__}: {tile}"
                ) from tile
        return tiles

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        index = int(self.samples[k])
        arrays = self._open()
        available = self.usable[k].copy()
        fractions = {}
        out: dict[str, torch.Tensor] = {}
        wanted = [m for column, m in enumerate(MODALITIES) if m in arrays and available[column]]
        tiles = self._read(index, wanted)
        for column, m in enumerate(MODALITIES):
            if m not in arrays:
                continue
            tile = tiles.get(m)
            # Unsigned S2 DN need no scan: nodata is 0 already, and ``usable`` was derived from
            # the store's nodata_fraction, computed with the same definition when it was written.
            if tile is not None and tile.dtype.kind != "u" and _all_valid(tile):
                fractions[m] = 0.0
            elif tile is not None and tile.dtype.kind != "u":
                invalid = invalid_values(tile)
                fractions[m] = float(invalid.any(axis=0).mean())
                if fractions[m] > self.nodata_threshold:
                    tile, available[column] = None, False
                else:
                    np.putmask(tile, invalid, 0)
            if tile is None:
                size = self.tile_size
                tile = np.zeros((len(BANDS[m]), size, size), arrays[m].dtype)
            out[m] = torch.from_numpy(tile)
        if not available.any():
            raise TileReadError(
                f"store {self.path}: sample {index} has no modality with nodata share <= "
                f"{self.nodata_threshold} (read: {fractions or 'none usable per metadata'})"
            )
        out["available"] = torch.from_numpy(available)
        out["worldcover_hist"] = torch.from_numpy(self.worldcover_hist[k])
        out["dominant_class"] = torch.tensor(self.dominant_class[k])
        out["index"] = torch.tensor(index)
        return out
