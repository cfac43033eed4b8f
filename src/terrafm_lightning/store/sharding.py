"""The sharding layout of the pixel arrays: where each whole-tile chunk lies, and the shard writer.

Pixel arrays are zarr v3 arrays with one sharding codec: a shard holds ``samples_per_shard``
inner chunks of one sample x all bands x whole tile each. The layout facts used are those of the
zarr v3 sharding spec: the index is ``chunks_per_shard`` pairs of little-endian uint64 (offset,
nbytes), followed by a crc32c when the index codecs say so; an empty chunk is
(2**64 - 1, 2**64 - 1). A chunk's bytes are the compressor's frame, followed by a crc32c of the
frame when the inner codecs end with zarr's ``crc32c`` codec (stores written before chunk
checksums were added do not; they still read, unchecked).

Why the read side reads this layout itself rather than through ``zarr.Array`` indexing:
zarr-python (3.1) decodes every chunk into a new array and copies it into the result, reads a
shard's index again for every read (two requests per chunk on object stores), and its GPU buffers
still run these codecs on the host. The reader needs the compressed bytes of a chunk (to move
them to a GPU, or to decode them straight into a shared-memory batch buffer).

The write side (:func:`write_samples`) is written here for the same layout, for speed: zarr
(3.1) copies every inner chunk into a fill-value buffer, runs its codec pipeline per chunk in
worker threads and concatenates the shard, which measured about twice the CPU of encoding the
same chunks (16-tile Major-TOM run at 534 px: writes 1.3 s against 0.5 s of blosc encode). Here
each chunk is encoded once with numcodecs from the tile itself, its crc32c appended, and each
shard is one object write of the chunks, then the index (its crc32c when the index codecs say
so), byte for byte what zarr writes for the same chunks (``tests/store``).

Checksums are computed with the ``crc32c`` package (hardware CRC32C, about 4x the speed of
``google_crc32c`` measured here: the chunk check's share of the reader's CPU time, see
``benchmarks/loader.py``); the values are the same CRC32C that zarr's codec computes.

zarr internals: the shard object is read and written through ``zarr.core.sync.sync`` and
``zarr.core.buffer.default_buffer_prototype`` (no public API reads or writes one stored object of
an array), hence the zarr range pinned in ``pyproject.toml`` (the versions this is tested with).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numpy as np
import zarr
import zarr.codecs
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from terrafm_lightning.store.codecs import COMPRESSOR_NAMES, chunk_encoder, decode_frame

EMPTY_CHUNK = 2**64 - 1
CHECKSUM_NBYTES = 4


class ChunkChecksumError(ValueError):
    """A chunk's bytes do not match the crc32c stored with them: the chunk is damaged."""


@dataclass(frozen=True)
class ChunkLayout:
    """Where the whole-tile inner chunks of a sharded pixel array lie and how they decode.

    Attributes:
        codec: ``"blosc"`` or ``"zstd"``.
        dtype: pixel dtype (little-endian).
        chunk_shape: shape of one inner chunk, (1, band, y, x).
        samples_per_shard: inner chunks per shard (along the sample axis).
        index_at_end: the shard index follows the chunks (else it precedes them).
        index_checksum: the index ends with a crc32c.
        chunk_checksum: every chunk ends with a crc32c of its compressed frame.
    """

    codec: str
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    samples_per_shard: int
    index_at_end: bool
    index_checksum: bool
    chunk_checksum: bool = True

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard index."""
        return 16 * self.samples_per_shard + CHECKSUM_NBYTES * self.index_checksum

    @property
    def chunk_nbytes(self) -> int:
        """Decoded bytes of one inner chunk."""
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    def parse_index(self, raw: bytes | memoryview) -> np.ndarray:
        """(samples_per_shard, 2) uint64 (offset, nbytes) of each chunk, checksum verified."""
        raw = memoryview(raw).cast("B")
        if len(raw) != self.index_nbytes:
            raise ValueError(f"shard index of {len(raw)} bytes, expected {self.index_nbytes}")
        body = raw[: 16 * self.samples_per_shard]
        if self.index_checksum:
            stored = struct.unpack_from("<I", raw, len(body))[0]
            if crc32c.crc32c(body) != stored:
                raise ValueError("shard index checksum mismatch")
        return np.frombuffer(body, "<u8").reshape(-1, 2)

    def shard_coords(self, shard: int) -> tuple[int, ...]:
        """Chunk-grid coordinates of shard ``shard`` (shards split the sample axis only)."""
        return (shard,) + (0,) * (len(self.chunk_shape) - 1)

    def encode_index(self, entries: np.ndarray) -> bytes:
        """Index bytes of (samples_per_shard, 2) (offset, nbytes) entries, crc32c appended."""
        body = np.ascontiguousarray(entries, "<u8").tobytes()
        if self.index_checksum:
            body += struct.pack("<I", crc32c.crc32c(body))
        return body

    def frame(self, chunk: memoryview | bytes) -> memoryview:
        """The compressed frame of a stored chunk, its crc32c verified (if it has one).

        Raises:
            ChunkChecksumError: the chunk's bytes do not match its checksum.
        """
        chunk = memoryview(chunk).cast("B")
        if not self.chunk_checksum:
            return chunk
        if len(chunk) < CHECKSUM_NBYTES:
            raise ChunkChecksumError(f"chunk of {len(chunk)} bytes has no room for its checksum")
        body = chunk[:-CHECKSUM_NBYTES]
        stored = struct.unpack_from("<I", chunk, len(body))[0]
        computed = crc32c.crc32c(body)
        if computed != stored:
            raise ChunkChecksumError(
                f"chunk checksum mismatch (stored crc32c {stored:08x}, computed {computed:08x})"
            )
        return body

    def seal(self, frame: bytes) -> bytes:
        """A compressed frame as stored: with its crc32c appended when the layout has one."""
        if not self.chunk_checksum:
            return frame
        return frame + struct.pack("<I", crc32c.crc32c(frame))

    def decode_into(self, chunk: memoryview | bytes, out: np.ndarray) -> None:
        """Verify and decode one stored chunk into ``out`` (C-contiguous, ``chunk_nbytes``)."""
        decode_frame(self.codec, self.frame(chunk), out)


def chunk_layout(array: zarr.Array) -> ChunkLayout:
    """The layout of a pixel array written by ``create_store``.

    Raises:
        ValueError: the array is not sharded one sample per inner chunk with a supported codec.
    """
    codecs = array.metadata.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], zarr.codecs.ShardingCodec):
        raise ValueError(f"expected one sharding codec, found {codecs}")
    sharding = codecs[0]
    inner = sharding.codecs
    checksum = len(inner) == 3 and isinstance(inner[2], zarr.codecs.Crc32cCodec)
    if (
        len(inner) != 2 + checksum
        or not isinstance(inner[0], zarr.codecs.BytesCodec)
        or type(inner[1]) not in COMPRESSOR_NAMES
    ):
        raise ValueError(f"unsupported inner codecs {inner}")
    index = sharding.index_codecs
    if not isinstance(index[0], zarr.codecs.BytesCodec) or not all(
        isinstance(c, zarr.codecs.Crc32cCodec) for c in index[1:]
    ):
        raise ValueError(f"unsupported shard index codecs {index}")
    shard_shape = array.metadata.chunk_grid.chunk_shape
    chunk_shape = tuple(sharding.chunk_shape)
    if chunk_shape[0] != 1 or tuple(shard_shape[1:]) != chunk_shape[1:]:
        raise ValueError(f"inner chunks {chunk_shape} are not one whole sample of {shard_shape}")
    endian = "<" if inner[0].endian is None or inner[0].endian.value == "little" else ">"
    dtype = np.dtype(array.dtype).newbyteorder(endian)
    if dtype.byteorder == ">":
        raise ValueError("big-endian pixel arrays are not supported")
    return ChunkLayout(
        codec=COMPRESSOR_NAMES[type(inner[1])],
        dtype=dtype,
        chunk_shape=chunk_shape,
        samples_per_shard=int(shard_shape[0]),
        index_at_end=sharding.index_location.value == "end",
        index_checksum=len(index) > 1,
        chunk_checksum=checksum,
    )


def shard_key(array: zarr.Array, layout: ChunkLayout, shard: int) -> str:
    """Store key of shard ``shard`` of ``array`` (for example ``s2_l2a/c/1/0/0/0``)."""
    return f"{array.path}/{array.metadata.encode_chunk_key(layout.shard_coords(shard))}"


def every_tile_holds_data(block: np.ndarray, fill: Any) -> bool:
    """Cheap proof that no tile of ``block`` (sample, ...) is all ``fill``: its first row is not.

    False means "not proven" (each tile then needs a full comparison).
    """
    first_rows = block[(slice(None),) + (0,) * (block.ndim - 2)]
    is_fill = np.isnan(first_rows) if np.isnan(fill) else first_rows == fill
    return bool((~is_fill).any(axis=-1).all())


def is_fill(tile: np.ndarray, fill: Any) -> bool:
    """Whether every value of ``tile`` is ``fill`` (NaN fill: every value NaN), as zarr decides."""
    if every_tile_holds_data(tile[None], fill):
        return False
    return bool(np.isnan(tile).all() if np.isnan(fill) else (tile == fill).all())


def write_samples(
    array: zarr.Array, indices: Sequence[int], tiles: Sequence[np.ndarray | None]
) -> None:
    """Write ``tiles[k]`` to sample ``indices[k]`` of a sharded pixel array, one write per shard.

    A tile that is None or all fill is left out of its shard (reads as the fill value), as zarr
    does; a shard left with no chunk is deleted. A shard only partly covered by ``indices`` keeps
    its other chunks (read back, not re-encoded). Only one process may write a given shard.
    """
    layout = chunk_layout(array)
    encoder = chunk_encoder(array.metadata.codecs[0].codecs[1])
    per = layout.samples_per_shard
    fill = array.fill_value
    shards: dict[int, dict[int, bytes | None]] = {}
    for i, tile in zip(indices, tiles, strict=True):
        if not 0 <= i < array.shape[0]:
            raise IndexError(f"sample {i} outside {array.name} of {array.shape[0]} samples")
        if tile is not None and tile.shape != layout.chunk_shape[1:]:
            raise ValueError(f"tile of shape {tile.shape}, expected {layout.chunk_shape[1:]}")
        chunk = None
        if tile is not None and not is_fill(tile, fill):
            chunk = layout.seal(encoder.encode(np.ascontiguousarray(tile, layout.dtype)))
        shards.setdefault(int(i) // per, {})[int(i) % per] = chunk
    for shard, chunks in shards.items():
        path = array.store_path / array.metadata.encode_chunk_key(layout.shard_coords(shard))
        if len(chunks) < min(per, array.shape[0] - shard * per):
            chunks = {**_stored_chunks(layout, path), **chunks}
        data = _shard_bytes(layout, chunks)
        sync(
            path.delete()
            if data is None
            else path.set(default_buffer_prototype().buffer.from_bytes(data))
        )


def _stored_chunks(layout: ChunkLayout, path: Any) -> dict[int, memoryview]:
    """The chunk bytes an existing shard holds, by position in the shard (empty if none)."""
    raw = sync(path.get())
    if raw is None:
        return {}
    data = memoryview(raw.as_numpy_array()).cast("B")
    index_at = len(data) - layout.index_nbytes if layout.index_at_end else 0
    index = layout.parse_index(data[index_at : index_at + layout.index_nbytes])
    return {
        k: data[int(offset) : int(offset) + int(nbytes)]
        for k, (offset, nbytes) in enumerate(index)
        if int(offset) != EMPTY_CHUNK
    }


def _shard_bytes(
    layout: ChunkLayout, chunks: Mapping[int, bytes | memoryview | None]
) -> bytes | None:
    """A shard's bytes (chunks in sample order, then the index, or index first), None if empty."""
    entries = np.full((layout.samples_per_shard, 2), EMPTY_CHUNK, np.uint64)
    parts = []
    offset = 0 if layout.index_at_end else layout.index_nbytes
    for k in sorted(chunks):
        chunk = chunks[k]
        if chunk is None:
            continue
        entries[k] = offset, len(chunk)
        offset += len(chunk)
        parts.append(chunk)
    if not parts:
        return None
    index = layout.encode_index(entries)
    return b"".join([*parts, index] if layout.index_at_end else [index, *parts])
