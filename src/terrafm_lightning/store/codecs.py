"""Pixel-chunk codecs of the store: what the writer compresses with and how chunk bytes decode.

Two codecs for the inner chunks of the pixel arrays (one sample x all bands x whole tile):

- ``"blosc"`` (default): blosc zstd with bit shuffle, the best CPU ratio and speed measured.
- ``"zstd"``: plain zstd frames (zarr v3's core ``zstd`` codec). nvCOMP decodes them on a GPU
  (``nvidia-nvcomp``, raw zstd bitstreams); blosc's shuffle has no GPU decoder.

Why the read side is written here rather than left to zarr: zarr-python (3.1) decodes every
chunk into a new array and copies it into the result, reads a shard's index again for every
read (two requests per chunk on object stores), and its GPU buffers still run these codecs on the
host. The reader needs the compressed bytes of a chunk (to move them to a GPU, or to decode them
straight into a shared-memory batch buffer), so this module reads the sharding layout from the
array's zarr metadata and decodes with numcodecs (CPU) or nvCOMP (GPU). The layout facts used
are those of the zarr v3 sharding spec: the index is ``chunks_per_shard`` pairs of little-endian
uint64 (offset, nbytes), followed by a crc32c when the index codecs say so; an empty chunk is
(2**64 - 1, 2**64 - 1).

The write side (:func:`write_samples`) is written here for the same layout, for speed: zarr
(3.1) copies every inner chunk into a fill-value buffer, runs its codec pipeline per chunk in
worker threads and concatenates the shard, which measured about twice the CPU of encoding the
same chunks (16-tile Major-TOM run at 534 px: writes 1.3 s against 0.5 s of blosc encode). Here
each chunk is encoded once with numcodecs from the tile itself, and each shard is one object
write of the chunks, then the index (its crc32c when the index codecs say so), byte for byte
what zarr writes for the same chunks (``tests/store``).
"""

from __future__ import annotations

import importlib.util
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import google_crc32c
import numcodecs
import numpy as np
import torch
import zarr
import zarr.codecs
from numcodecs.abc import Codec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

CODECS = ("blosc", "zstd")
GPU_CODECS = frozenset({"zstd"})
"""Codecs whose chunk bytes a GPU library (nvCOMP) decodes."""
EMPTY_CHUNK = 2**64 - 1
BLOSC_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
ZSTD_MAGIC = 0xFD2FB528


def compressor(
    codec: str, clevel: int, cname: str = "zstd", shuffle: str = "bitshuffle"
) -> zarr.abc.codec.BytesBytesCodec:
    """The zarr codec applied to every inner chunk of the pixel arrays.

    Args:
        codec: ``"blosc"`` or ``"zstd"`` (see the module docstring).
        clevel: compression level.
        cname: blosc's inner compressor (``"blosc"`` only).
        shuffle: blosc's shuffle (``"blosc"`` only).
    """
    if codec == "blosc":
        return zarr.codecs.BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)
    if codec == "zstd":
        return zarr.codecs.ZstdCodec(level=clevel, checksum=False)
    raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")


def _zstd_content_size(frame: memoryview) -> int | None:
    """Decompressed size from a zstd frame header (RFC 8878, 3.1.1.1), None if not recorded."""
    if len(frame) < 6 or struct.unpack_from("<I", frame)[0] != ZSTD_MAGIC:
        raise ValueError("not a zstd frame")
    descriptor = frame[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    position = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    size = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if size == 0:
        return None
    value = int.from_bytes(frame[position : position + size], "little")
    return value + 256 if size == 2 else value


def _blosc_content_size(frame: memoryview) -> int:
    """Decompressed size from a blosc frame header (bytes 4..8, little-endian uint32)."""
    if len(frame) < 16:
        raise ValueError("not a blosc frame")
    return struct.unpack_from("<I", frame, 4)[0]


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
    """

    codec: str
    dtype: np.dtype
    chunk_shape: tuple[int, ...]
    samples_per_shard: int
    index_at_end: bool
    index_checksum: bool

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard index."""
        return 16 * self.samples_per_shard + 4 * self.index_checksum

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
            if google_crc32c.value(bytes(body)) != stored:
                raise ValueError("shard index checksum mismatch")
        return np.frombuffer(body, "<u8").reshape(-1, 2)

    def shard_coords(self, shard: int) -> tuple[int, ...]:
        """Chunk-grid coordinates of shard ``shard`` (shards split the sample axis only)."""
        return (shard,) + (0,) * (len(self.chunk_shape) - 1)

    def encode_index(self, entries: np.ndarray) -> bytes:
        """Index bytes of (samples_per_shard, 2) (offset, nbytes) entries, crc32c appended."""
        body = np.ascontiguousarray(entries, "<u8").tobytes()
        if self.index_checksum:
            body += struct.pack("<I", google_crc32c.value(body))
        return body

    def decode_into(self, frame: memoryview | bytes, out: np.ndarray) -> None:
        """Decode one chunk's bytes into ``out`` (C-contiguous, ``chunk_nbytes`` bytes)."""
        frame = memoryview(frame).cast("B")
        expected = (
            _blosc_content_size(frame) if self.codec == "blosc" else _zstd_content_size(frame)
        )
        if expected is not None and expected != out.nbytes:
            raise ValueError(f"chunk decodes to {expected} bytes, expected {out.nbytes}")
        _numcodecs_decoder(self.codec).decode(frame, out)


def _numcodecs_decoder(codec: str) -> Codec:
    # Decoding needs no settings: blosc and zstd frames carry what they need.
    return numcodecs.Blosc() if codec == "blosc" else numcodecs.Zstd()


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


def chunk_encoder(array: zarr.Array) -> Codec:
    """The numcodecs codec encoding an inner chunk exactly as the array's zarr codec does."""
    inner = array.metadata.codecs[0].codecs[1]
    if isinstance(inner, zarr.codecs.BloscCodec):
        return numcodecs.Blosc(
            cname=inner.cname.value,
            clevel=inner.clevel,
            shuffle=BLOSC_SHUFFLES[inner.shuffle.value],
            blocksize=inner.blocksize,
            typesize=inner.typesize,
        )
    if isinstance(inner, zarr.codecs.ZstdCodec):
        return numcodecs.Zstd(level=inner.level, checksum=inner.checksum)
    raise ValueError(f"unsupported inner codec {inner}")


def write_samples(
    array: zarr.Array, indices: Sequence[int], tiles: Sequence[np.ndarray | None]
) -> None:
    """Write ``tiles[k]`` to sample ``indices[k]`` of a sharded pixel array, one write per shard.

    A tile that is None or all fill is left out of its shard (reads as the fill value), as zarr
    does; a shard left with no chunk is deleted. A shard only partly covered by ``indices`` keeps
    its other chunks (read back, not re-encoded). Only one process may write a given shard.
    """
    layout = chunk_layout(array)
    encoder = chunk_encoder(array)
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
            chunk = encoder.encode(np.ascontiguousarray(tile, layout.dtype))
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
    kinds = {zarr.codecs.BloscCodec: "blosc", zarr.codecs.ZstdCodec: "zstd"}
    if (
        len(inner) != 2
        or not isinstance(inner[0], zarr.codecs.BytesCodec)
        or type(inner[1]) not in kinds
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
        codec=kinds[type(inner[1])],
        dtype=dtype,
        chunk_shape=chunk_shape,
        samples_per_shard=int(shard_shape[0]),
        index_at_end=sharding.index_location.value == "end",
        index_checksum=len(index) > 1,
    )


class DeviceDecoder(Protocol):
    """Decodes compressed chunks that already lie on ``device`` into tensors there."""

    device: torch.device

    def decode(
        self, layout: ChunkLayout, chunks: Sequence[torch.Tensor], out: Sequence[torch.Tensor]
    ) -> None:
        """Decode each uint8 tensor of ``chunks`` into the matching contiguous ``out`` tensor."""


class HostChunkDecoder:
    """The device flow (chunk bytes as tensors, decoded into tensors) run on the CPU.

    Used where no GPU decoder applies, and by tests to check the flow tile for tile against
    the workers' CPU decode.
    """

    device = torch.device("cpu")

    def decode(
        self, layout: ChunkLayout, chunks: Sequence[torch.Tensor], out: Sequence[torch.Tensor]
    ) -> None:
        """Decode with numcodecs, chunk by chunk."""
        for chunk, target in zip(chunks, out, strict=True):
            layout.decode_into(chunk.numpy(), target.view(torch.uint8).numpy())


class NvcompDecoder:
    """nvCOMP batch decode of raw zstd frames on a CUDA device (``nvidia-nvcomp``).

    Not run in this project's CI (no GPU); ``benchmarks/gpu_check.py`` exercises it on a GPU.
    """

    def __init__(self, device: torch.device) -> None:
        from nvidia import nvcomp

        self.device = device
        self._nvcomp = nvcomp
        self._codec = nvcomp.Codec(
            algorithm="Zstd",
            device_id=device.index or 0,
            cuda_stream=torch.cuda.current_stream(device).cuda_stream,
            bitstream_kind=nvcomp.BitstreamKind.RAW,
        )

    def decode(
        self, layout: ChunkLayout, chunks: Sequence[torch.Tensor], out: Sequence[torch.Tensor]
    ) -> None:
        """Decode every chunk in one nvCOMP batch straight into ``out``."""
        if layout.codec not in GPU_CODECS:
            raise ValueError(f"nvCOMP cannot decode {layout.codec!r} chunks")
        if not chunks:
            return
        nvcomp = self._nvcomp
        targets = [t.view(torch.uint8).reshape(-1) for t in out]
        self._codec.decode(nvcomp.as_arrays(list(chunks)), out=nvcomp.as_arrays(targets))


def nvcomp_available() -> bool:
    """True when CUDA and the ``nvidia-nvcomp`` package are present."""
    return torch.cuda.is_available() and importlib.util.find_spec("nvidia.nvcomp") is not None


def device_decoder(codec: str, device: torch.device) -> DeviceDecoder | None:
    """The GPU decoder for ``codec`` on ``device``, or None (decode on the CPU, in the workers)."""
    if device.type == "cuda" and codec in GPU_CODECS and nvcomp_available():
        return NvcompDecoder(device)
    return None
