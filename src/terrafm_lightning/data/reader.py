"""Batch reader of whole store tiles: every tile and modality of a batch fetched concurrently.

:class:`StoreTileDataset` is a batch-level map dataset: the DataLoader hands a worker the list of
a batch's positions (``__getitems__``) and the worker

1. fetches the compressed inner chunk of every (tile, modality) of the batch at once on zarr's
   event loop (``asyncio.gather`` over the store's byte-range reads), one read per chunk once the
   shard's index is in the worker's cache (:class:`ShardReader`);
2. decodes each chunk straight into one (B, C, H, W) buffer per modality; inside workers the
   buffers are shared memory from a :class:`BufferPool`, reused once the main process has
   dropped them, so a batch crosses to the main process as file descriptors: no per-tile
   tensors pickled, no collate copy (:func:`collate_tile_batch` is the identity), no fresh
   pages to fault in per batch;
3. or, with :attr:`StoreTileDataset.encoded`, leaves the chunks compressed (one shared byte
   buffer per modality) for :meth:`StoreTileDataset.decode_encoded` to decode on the device.

Reading chunk bytes by hand instead of through ``zarr.Array`` indexing: see
:mod:`terrafm_lightning.store.codecs` (zarr re-reads shard indexes, decodes into new arrays and
has no GPU decode for these codecs). Nodata rules come from the store format
(:data:`~terrafm_lightning.store.format.NODATA`); per-sample metadata lives in shared memory so
spawned workers map it instead of each unpickling a copy.
"""

from __future__ import annotations

import asyncio
import math
import mmap
import os
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.reduction import DupFd
from typing import Any, NoReturn

import numpy as np
import torch
import zarr
from torch.utils.data import Dataset, get_worker_info
from zarr.abc.store import RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, default_buffer_prototype
from zarr.core.sync import sync

from terrafm_lightning.batch import EncodedTileBatch, TileBatch
from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.store.codecs import EMPTY_CHUNK, ChunkLayout, DeviceDecoder, chunk_layout
from terrafm_lightning.store.format import StoreError, open_store
from terrafm_lightning.store.schema import NODATA, WRITTEN

SHARD_INDEX_CACHE = 4096
"""Shard indexes a worker keeps per modality (about 600 bytes each at 16 samples per shard)."""


class TileReadError(StoreError):
    """A tile could not be read or has no available modality (the message names store, sample)."""


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

    def selected(self, modalities: Sequence[str], nodata_threshold: float) -> np.ndarray:
        """(N, 3) ``available`` restricted to ``modalities`` and to nodata shares <= threshold.

        The datamodule's modality selection, applied once, here.
        """
        chosen = np.array([m in modalities for m in MODALITIES])
        return self.available & (self.nodata_fraction <= nodata_threshold) & chosen


def replace_nodata(
    pixels: torch.Tensor, modality: str, available: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Zero nodata pixels in place; a row whose nodata share exceeds ``threshold`` becomes absent.

    Works batched on any device without a host synchronisation (no data-dependent branch).
    Modalities whose nodata value is 0 (S2 DN) need no scan: their nodata is 0 already and
    ``available`` came from the store's ``nodata_fraction``, computed with the same rule.

    Args:
        pixels: (B, C, H, W) decoded tiles of ``modality``.
        modality: modality key (its nodata value is ``NODATA[modality]``).
        available: (B,) bool, rows that hold the modality.
        threshold: largest nodata pixel share (a pixel is nodata when any band is).

    Returns:
        (B,) bool: ``available`` with too-empty rows removed.
    """
    nodata = NODATA[modality]
    if nodata == 0:
        return available
    invalid = torch.isnan(pixels) if math.isnan(nodata) else pixels == nodata
    share = invalid.any(dim=1).flatten(1).float().mean(dim=1)
    keep = available & (share <= threshold)
    pixels.masked_fill_(invalid | ~keep.view(-1, 1, 1, 1), 0)
    return keep


def collate_tile_batch(batch: TileBatch | EncodedTileBatch) -> TileBatch | EncodedTileBatch:
    """The DataLoader collate of :class:`StoreTileDataset`: batches come out already assembled."""
    return batch


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
        arrays = {m: root[m] for m in modalities}
        self.store = root.store
        self.layouts: dict[str, ChunkLayout] = {}
        for m, array in arrays.items():
            try:
                self.layouts[m] = chunk_layout(array)
            except ValueError as err:
                raise StoreError(f"array {m}: {err}") from err
        self._keys = {m: (array.path, array.metadata) for m, array in arrays.items()}
        self._indexes: dict[str, OrderedDict[int, asyncio.Future]] = {
            m: OrderedDict() for m in modalities
        }
        self.cache_size = cache_size

    def _shard_key(self, modality: str, shard: int) -> str:
        path, metadata = self._keys[modality]
        return f"{path}/{metadata.encode_chunk_key(self.layouts[modality].shard_coords(shard))}"

    async def _load_index(self, modality: str, shard: int) -> np.ndarray | None:
        layout = self.layouts[modality]
        request = (
            SuffixByteRequest(layout.index_nbytes)
            if layout.index_at_end
            else RangeByteRequest(0, layout.index_nbytes)
        )
        raw = await self.store.get(
            self._shard_key(modality, shard), default_buffer_prototype(), request
        )
        return None if raw is None else layout.parse_index(raw.as_numpy_array())

    async def _index(self, modality: str, shard: int) -> np.ndarray | None:
        cache = self._indexes[modality]
        future = cache.get(shard)
        if future is None:
            future = asyncio.ensure_future(self._load_index(modality, shard))
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
        """The compressed chunk of ``sample``, or None where it was never written (fill value)."""
        layout = self.layouts[modality]
        shard, k = divmod(sample, layout.samples_per_shard)
        index = await self._index(modality, shard)
        if index is None or int(index[k, 0]) == EMPTY_CHUNK:
            return None
        offset, nbytes = (int(v) for v in index[k])
        data = await self.store.get(
            self._shard_key(modality, shard),
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


def _buffer(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory inside a DataLoader worker (sent as a handle)."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, tuple(shape))


FREE, HELD = 0, 1


@dataclass
class _ReceivedPool:
    """Main-process side of one worker's pool: its control block and the buffers' descriptors."""

    control: mmap.mmap
    fds: dict[int, int] = field(default_factory=dict)


_RECEIVED: dict[tuple[int, int], _ReceivedPool] = {}
"""Main-process view of the workers' pools, by (worker pid, pool id)."""


class BufferPool:
    """A worker's reusable shared-memory batch buffers (memfd), recycled when the main is done.

    A fresh shared-memory buffer per batch costs a page fault per 4 KiB page in the worker
    (measured: +10 ms of CPU per 534 px tile). Here a buffer is sent as a file descriptor, once;
    later batches name only its slot (:class:`PooledBuffer`). The main process maps it as a
    tensor and, when the mapping is freed (``weakref.finalize`` on the mmap, which the tensor and
    all its views keep alive), marks the slot free in a small control block shared with the
    worker. The worker reuses only slots so marked, so a buffer is never written while anyone can
    read it. The pool grows to the number of batches in flight (prefetch, pinning, batches held
    by the user), at most ``capacity`` buffers; beyond that, buffers are not pooled.

    Args:
        capacity: most pooled buffers.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self.control_fd = os.memfd_create("terrafm-pool-control")
        os.ftruncate(self.control_fd, capacity)
        self.control = mmap.mmap(self.control_fd, capacity)
        self.state = np.frombuffer(self.control, np.uint8)
        self.key = (os.getpid(), id(self))
        self.buffers: list[tuple[int, mmap.mmap]] = []  # (memfd, mapping)
        self.sent: set[int] = set()  # slots whose descriptor the main process has
        self.control_sent = False

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """A (shape, dtype) tensor to fill here and the handle to return in its place.

        The handle unpickles to the tensor in the main process; a tensor that is not pooled
        (pool full) is its own handle.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        for slot, (_, mapping) in enumerate(self.buffers):
            if len(mapping) == nbytes and self.state[slot] == FREE:
                break
        else:
            if len(self.buffers) == self.capacity:
                tensor = _buffer(shape, dtype)
                return tensor, tensor
            fd = os.memfd_create("terrafm-batch")
            os.ftruncate(fd, nbytes)
            self.buffers.append((fd, mmap.mmap(fd, nbytes)))
            slot = len(self.buffers) - 1
        self.state[slot] = HELD
        tensor = torch.frombuffer(self.buffers[slot][1], dtype=dtype).view(tuple(shape))
        return tensor, PooledBuffer(self, slot, tuple(shape), dtype)


class PooledBuffer:
    """Pickle handle of a pooled buffer: slot, shape and dtype (descriptors the first time)."""

    def __init__(
        self, pool: BufferPool, slot: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        self.pool, self.slot, self.shape, self.dtype = pool, slot, shape, dtype

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        pool = self.pool
        fd, mapping = pool.buffers[self.slot]
        # Every batch reaches the main process (it drains the queue even on a reset), so a
        # descriptor sent once stays known there.
        data = None if self.slot in pool.sent else DupFd(fd)
        control = None if pool.control_sent else DupFd(pool.control_fd)
        pool.sent.add(self.slot)
        pool.control_sent = True
        args = (data, control, pool.key, pool.capacity, self.slot, len(mapping))
        return _map_pooled, (*args, self.shape, self.dtype)


def _map_pooled(
    data: Any,
    control: Any,
    key: tuple[int, int],
    capacity: int,
    slot: int,
    nbytes: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Main process: map a pooled buffer as a tensor that frees its slot when it dies."""
    if control is not None:
        _forget_dead_workers()
        control_fd = control.detach()
        try:
            _RECEIVED[key] = _ReceivedPool(mmap.mmap(control_fd, capacity))
        finally:
            os.close(control_fd)
    pool = _RECEIVED[key]
    if data is not None:
        pool.fds[slot] = data.detach()
    mapping = mmap.mmap(pool.fds[slot], nbytes)
    weakref.finalize(mapping, _release, pool.control, slot)
    return torch.frombuffer(mapping, dtype=dtype).view(shape)


def _forget_dead_workers() -> None:
    """Close the descriptors of pools whose worker exited (their live tensors stay mapped)."""
    for key in [key for key in _RECEIVED if not _alive(key[0])]:
        for fd in _RECEIVED.pop(key).fds.values():
            os.close(fd)


class InlineTensor:
    """Pickle handle that sends a small tensor by value, inside the batch's pickle.

    Torch would send each tensor through a new shared-memory segment and a descriptor: a socket
    handshake per tensor, more than the bytes of a batch's metadata cost.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.array = tensor.numpy()

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray]]:
        return torch.from_numpy, (self.array,)


METADATA_KEYS = ("available", "worldcover_hist", "dominant_class", "index")


def _inline_metadata(batch: dict[str, Any]) -> dict[str, Any]:
    """In a DataLoader worker, send the small per-tile metadata tensors by value."""
    if get_worker_info() is not None:
        for key in METADATA_KEYS:
            batch[key] = InlineTensor(batch[key])
    return batch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _release(control: mmap.mmap, slot: int) -> None:
    control[slot] = FREE


def _shared(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).share_memory_()


class StoreTileDataset(Dataset):
    """Whole tiles of the selected modalities, read a batch at a time (``docs/contracts.md``).

    The store is opened on first access in the process that reads (each DataLoader worker), never
    pickled; the per-sample metadata is held in shared memory, so workers map it. Tiles keep the
    store dtype (S1 float32, S2 uint16; :class:`MultiCrop` converts on the device). Nodata becomes
    0 and a modality whose nodata pixel share exceeds ``nodata_threshold`` counts as absent
    (:func:`replace_nodata`); absent rows are all 0. Use with ``collate_fn=collate_tile_batch``.

    Args:
        path: local store path or fsspec URL.
        samples: store sample indices this dataset serves.
        available: (len(samples), 3) modalities to read per sample
            (:meth:`SampleMetadata.selected`: the datamodule's selection is already applied).
        worldcover_hist: (len(samples), 11) class shares.
        dominant_class: (len(samples),) dominant WorldCover codes.
        modalities: modalities to return (a key per modality, zeros where absent).
        nodata_threshold: the largest nodata pixel share an available modality may have.
        storage_options: fsspec options for remote stores.
    """

    encoded: bool = False
    """Yield compressed chunks (:class:`EncodedTileBatch`) for decoding on the device."""

    def __init__(
        self,
        path: str,
        samples: np.ndarray,
        available: np.ndarray,
        worldcover_hist: np.ndarray,
        dominant_class: np.ndarray,
        modalities: Sequence[str],
        nodata_threshold: float = 0.5,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self._columns = {
            "index": _shared(np.asarray(samples, np.int64)),
            "available": _shared(np.asarray(available, bool)),
            "worldcover_hist": _shared(np.asarray(worldcover_hist, np.float32)),
            "dominant_class": _shared(np.asarray(dominant_class, np.int64)),
        }
        self.modalities = [m for m in MODALITIES if m in set(modalities)]
        self.nodata_threshold = nodata_threshold
        self.storage_options = dict(storage_options or {})
        self._reader: ShardReader | None = None
        self._pool: BufferPool | None = None

    @property
    def samples(self) -> np.ndarray:
        """(N,) store sample indices."""
        return self._columns["index"].numpy()

    @property
    def available(self) -> np.ndarray:
        """(N, 3) modalities read per sample."""
        return self._columns["available"].numpy()

    @property
    def worldcover_hist(self) -> np.ndarray:
        """(N, 11) WorldCover class shares."""
        return self._columns["worldcover_hist"].numpy()

    @property
    def dominant_class(self) -> np.ndarray:
        """(N,) dominant WorldCover codes."""
        return self._columns["dominant_class"].numpy()

    def __len__(self) -> int:
        return len(self._columns["index"])

    def __getstate__(self) -> dict[str, Any]:
        # Workers open their own handles; an open zarr group never crosses a process boundary.
        return {**self.__dict__, "_reader": None, "_pool": None}

    def open(self) -> ShardReader:
        """The store's chunk reader in this process (opened on first use)."""
        if self._reader is None:
            root = open_store(self.path, storage_options=self.storage_options)
            missing = [m for m in self.modalities if m not in root.attrs["modalities"]]
            if missing:
                raise StoreError(f"store {self.path} has no modality {missing}")
            try:
                self._reader = ShardReader(root, self.modalities)
            except StoreError as err:
                raise StoreError(f"store {self.path}: {err}") from err
        return self._reader

    @property
    def codecs(self) -> set[str]:
        """The chunk codecs of the selected pixel arrays."""
        return {layout.codec for layout in self.open().layouts.values()}

    def _metadata(self, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: self._columns[key][positions] for key in METADATA_KEYS}

    def _fetch(
        self, indices: Sequence[int], available: np.ndarray
    ) -> dict[str, list[Buffer | None]]:
        """Compressed chunks per modality and row (None: not read or never written)."""
        reader = self.open()
        wanted = [
            (m, row)
            for row in range(len(indices))
            for m in self.modalities
            if available[row, MODALITIES.index(m)]
        ]
        fetched = reader.chunks([(m, int(indices[row])) for m, row in wanted])
        chunks: dict[str, list[Buffer | None]] = {m: [None] * len(indices) for m in self.modalities}
        for (m, row), chunk in zip(wanted, fetched, strict=True):
            if isinstance(chunk, BaseException):
                self._fail(m, indices[row], chunk)
            chunks[m][row] = chunk
        return chunks

    def _fail(self, modality: str, index: int, err: BaseException) -> NoReturn:
        raise TileReadError(
            f"store {self.path}: cannot read {modality} of sample {index}: "
            f"{type(err).__name__}: {err}"
        ) from err

    def __getitems__(self, positions: Sequence[int]) -> TileBatch | EncodedTileBatch:
        """The batch of ``positions``: decoded tiles, or compressed chunks if :attr:`encoded`."""
        meta = self._metadata(torch.as_tensor(positions, dtype=torch.int64))
        indices = meta["index"].tolist()
        chunks = self._fetch(indices, meta["available"].numpy())
        if self.encoded:
            return _inline_metadata(self._encoded_batch(meta, chunks))
        batch: dict[str, Any] = dict(meta)
        for m in self.modalities:
            layout = self._reader.layouts[m]
            shape = (len(indices), *layout.chunk_shape[1:])
            pixels, batch[m] = self._pixels(shape, _torch_dtype(layout))
            column = MODALITIES.index(m)
            for row, chunk in enumerate(chunks[m]):
                tile = pixels[row]
                if chunk is None:  # not read (absent) or never written (fill value)
                    tile.numpy().fill(NODATA[m] if meta["available"][row, column] else 0)
                    continue
                try:
                    layout.decode_into(chunk.as_numpy_array(), tile.numpy())
                except Exception as err:  # any codec failure is reported with the tile
                    self._fail(m, indices[row], err)
            # Rows scanned one by one while they are still in cache.
            for row in range(len(indices)):
                keep = replace_nodata(
                    pixels[row : row + 1],
                    m,
                    meta["available"][row : row + 1, column],
                    self.nodata_threshold,
                )
                meta["available"][row, column] = keep[0]
        self._check_not_empty(meta["available"], indices)
        return _inline_metadata(batch)

    def _pixels(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """A batch buffer to decode into and what the batch returns for it (see BufferPool)."""
        if get_worker_info() is None:
            tensor = _buffer(shape, dtype)
            return tensor, tensor
        if self._pool is None:
            self._pool = BufferPool()
        return self._pool.take(shape, dtype)

    def _check_not_empty(self, available: torch.Tensor, indices: Sequence[int]) -> None:
        empty = (~available.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise TileReadError(
                f"store {self.path}: sample {indices[empty[0]]} has no modality with nodata "
                f"share <= {self.nodata_threshold} among {self.modalities}"
            )

    def _encoded_batch(
        self, meta: dict[str, torch.Tensor], chunks: dict[str, list[Buffer | None]]
    ) -> EncodedTileBatch:
        batch: dict[str, Any] = {**meta, "chunks": {}, "chunk_offsets": {}}
        for m, row_chunks in chunks.items():
            sizes = [0 if c is None else len(c) for c in row_chunks]
            offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
            data = _buffer((offsets[-1],), torch.uint8)
            flat = data.numpy()
            for chunk, start, stop in zip(row_chunks, offsets[:-1], offsets[1:], strict=True):
                if chunk is not None:
                    flat[start:stop] = chunk.as_numpy_array()
            batch["chunks"][m] = data
            batch["chunk_offsets"][m] = offsets
        return batch

    def decode_encoded(self, batch: EncodedTileBatch, decoder: DeviceDecoder) -> TileBatch:
        """Decode an :class:`EncodedTileBatch` whose tensors lie on ``decoder.device``.

        The same result as the workers' CPU decode, except that a row left without any available
        modality is not reported (that check would synchronise with the device).
        """
        reader = self.open()
        out: dict[str, Any] = {k: v for k, v in batch.items() if k not in ENCODED_KEYS}
        available = out["available"].clone()
        rows = len(available)
        for m in self.modalities:
            layout = reader.layouts[m]
            column = MODALITIES.index(m)
            offsets = batch["chunk_offsets"][m]
            data = batch["chunks"][m]
            dtype = _torch_dtype(layout)
            # Zeroed through a signed view: CUDA fills no unsigned 16-bit tensor.
            pixels = torch.zeros(
                (rows, *layout.chunk_shape[1:]), dtype=_signed(dtype), device=decoder.device
            ).view(dtype)
            present = [row for row in range(rows) if offsets[row + 1] > offsets[row]]
            decoder.decode(
                layout,
                [data[offsets[row] : offsets[row + 1]] for row in present],
                [pixels[row] for row in present],
            )
            unwritten = sorted(set(range(rows)) - set(present))
            if unwritten and pixels.is_floating_point():  # fill value where a chunk is missing
                rows_index = torch.tensor(unwritten, device=decoder.device)
                fill = torch.where(available[rows_index, column], NODATA[m], 0.0).to(dtype)
                pixels[rows_index] = fill.view(-1, 1, 1, 1).expand(-1, *pixels.shape[1:])
            available[:, column] = replace_nodata(
                pixels, m, available[:, column], self.nodata_threshold
            )
            out[m] = pixels
        out["available"] = available
        return out

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        """One tile (the batch of one, unbatched): for code that reads tile by tile."""
        return {key: value[0] for key, value in self.__getitems__([k]).items()}


ENCODED_KEYS = ("chunks", "chunk_offsets")


def _torch_dtype(layout: ChunkLayout) -> torch.dtype:
    return torch.from_numpy(np.empty(0, layout.dtype)).dtype


def _signed(dtype: torch.dtype) -> torch.dtype:
    """A dtype of the same width that every device can fill."""
    if dtype.is_floating_point:
        return dtype
    return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
