"""Concurrent byte-range reads of whole-tile chunks from a store's sharded pixel arrays.

Each read goes straight to the shard object (layout in :mod:`terrafm_lightning.store.sharding`):
the shard's index once (cached per process), then one byte-range read per chunk, all requests of
a batch gathered on zarr's event loop.

zarr internals: the event loop (``zarr.core.sync.sync``) and buffer prototype
(``zarr.core.buffer``) have no public equivalent for byte-range reads of one stored object,
hence the zarr range pinned in ``pyproject.toml`` (the versions this is tested with).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync

from terrafm_lightning.store.format import StoreError
from terrafm_lightning.store.sharding import EMPTY_CHUNK, ChunkLayout, chunk_layout, shard_key

SHARD_INDEX_CACHE = 4096
"""Shard indexes a process keeps per modality (about 600 bytes each at 16 samples per shard)."""


class ShardReader:
    """Byte-range reads of whole-tile chunks from a store's sharded pixel arrays.

    Shard indexes are cached per process (LRU, ``cache_size`` shards per modality), so a tile
    whose shard was seen costs one read per modality; concurrent requests for one index share
    a single read.

    Args:
        root: the opened store.
        modalities: pixel arrays to read.
        cache_size: shard indexes kept per modality.
    """

    def __init__(
        self, root: zarr.Group, modalities: Sequence[str], cache_size: int = SHARD_INDEX_CACHE
    ) -> None:
        self.store = root.store
        self.layouts: dict[str, ChunkLayout] = {}
        self._arrays = {m: root[m] for m in modalities}
        for m, array in self._arrays.items():
            try:
                self.layouts[m] = chunk_layout(array)
            except ValueError as err:
                raise StoreError(f"array {m}: {err}") from err
        self._indexes: dict[str, OrderedDict[int, asyncio.Future]] = {
            m: OrderedDict() for m in modalities
        }
        self.cache_size = cache_size

    def shard_key(self, modality: str, sample: int) -> str:
        """Store key of the shard holding ``sample`` of ``modality`` (``s1/c/3/0/0/0``)."""
        layout = self.layouts[modality]
        return shard_key(self._arrays[modality], layout, sample // layout.samples_per_shard)

    async def _load_index(self, modality: str, sample: int) -> np.ndarray | None:
        layout = self.layouts[modality]
        request = (
            SuffixByteRequest(layout.index_nbytes)
            if layout.index_at_end
            else RangeByteRequest(0, layout.index_nbytes)
        )
        raw = await self.store.get(
            self.shard_key(modality, sample), default_buffer_prototype(), request
        )
        return None if raw is None else layout.parse_index(raw.as_numpy_array())

    async def _index(self, modality: str, sample: int) -> np.ndarray | None:
        cache = self._indexes[modality]
        shard = sample // self.layouts[modality].samples_per_shard
        future = cache.get(shard)
        if future is None:
            future = asyncio.ensure_future(self._load_index(modality, sample))
            cache[shard] = future
            if len(cache) > self.cache_size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(shard)
        try:
            return await future
        except BaseException:
            cache.pop(shard, None)  # a failed read is retried next time
            raise

    async def chunk(self, modality: str, sample: int) -> Buffer | None:
        """The stored chunk of ``sample``, or None where it was never written (fill value)."""
        k = sample % self.layouts[modality].samples_per_shard
        index = await self._index(modality, sample)
        if index is None or int(index[k, 0]) == EMPTY_CHUNK:
            return None
        offset, nbytes = (int(v) for v in index[k])
        data = await self.store.get(
            self.shard_key(modality, sample),
            default_buffer_prototype(),
            RangeByteRequest(offset, offset + nbytes),
        )
        if data is None or len(data) != nbytes:
            raise ValueError(f"shard holds {0 if data is None else len(data)} of {nbytes} bytes")
        return data

    def chunks(self, requests: Sequence[tuple[str, int]]) -> list[Buffer | None | BaseException]:
        """Fetch many (modality, sample) chunks in one round trip to zarr's event loop."""

        async def fetch_all() -> list[Any]:
            reads = (self.chunk(m, sample) for m, sample in requests)
            return await asyncio.gather(*reads, return_exceptions=True)

        return sync(fetch_all())
