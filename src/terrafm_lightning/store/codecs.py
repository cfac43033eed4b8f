"""Chunk codecs of the store's pixel arrays: the zarr codec chain and the numcodecs equivalents.

Two compressors for the inner chunks (one sample x all bands x whole tile):

- ``"blosc"`` (default): blosc zstd with bit shuffle, the best CPU ratio and speed measured.
- ``"zstd"``: plain zstd frames (zarr v3's core ``zstd`` codec). nvCOMP decodes them on a GPU
  (``nvidia-nvcomp``, raw zstd bitstreams); blosc's shuffle has no GPU decoder.

Each compressed chunk then carries zarr v3's ``crc32c`` codec (4 bytes, little-endian, of the
compressed bytes), so every reader of the store (zarr, xarray, the batch reader) verifies it.
The batch reader and the shard writer encode and decode with numcodecs (see
:mod:`terrafm_lightning.store.sharding` for why); this module maps zarr's codecs to them.
"""

from __future__ import annotations

import struct

import numcodecs
import numpy as np
import zarr
import zarr.codecs
from numcodecs.abc import Codec

CODECS = ("blosc", "zstd")
GPU_CODECS = frozenset({"zstd"})
"""Codecs whose chunk bytes a GPU library (nvCOMP) decodes."""
BLOSC_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
ZSTD_MAGIC = 0xFD2FB528
COMPRESSOR_NAMES: dict[type, str] = {zarr.codecs.BloscCodec: "blosc", zarr.codecs.ZstdCodec: "zstd"}
"""zarr compressor class -> codec name."""


def compressors(
    codec: str,
    clevel: int,
    cname: str = "zstd",
    shuffle: str = "bitshuffle",
    checksum: bool = True,
) -> tuple[zarr.abc.codec.BytesBytesCodec, ...]:
    """The zarr bytes-to-bytes codecs applied to every inner chunk of the pixel arrays.

    Args:
        codec: ``"blosc"`` or ``"zstd"`` (see the module docstring).
        clevel: compression level.
        cname: blosc's inner compressor (``"blosc"`` only).
        shuffle: blosc's shuffle (``"blosc"`` only).
        checksum: end the chain with zarr's ``crc32c`` codec (a checksum per chunk).
    """
    if codec == "blosc":
        first: zarr.abc.codec.BytesBytesCodec = zarr.codecs.BloscCodec(
            cname=cname, clevel=clevel, shuffle=shuffle
        )
    elif codec == "zstd":
        first = zarr.codecs.ZstdCodec(level=clevel, checksum=False)
    else:
        raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    return (first, zarr.codecs.Crc32cCodec()) if checksum else (first,)


def chunk_encoder(compressor: zarr.abc.codec.BytesBytesCodec) -> Codec:
    """The numcodecs codec that encodes a chunk exactly as the zarr ``compressor`` does."""
    if isinstance(compressor, zarr.codecs.BloscCodec):
        return numcodecs.Blosc(
            cname=compressor.cname.value,
            clevel=compressor.clevel,
            shuffle=BLOSC_SHUFFLES[compressor.shuffle.value],
            blocksize=compressor.blocksize,
            typesize=compressor.typesize,
        )
    if isinstance(compressor, zarr.codecs.ZstdCodec):
        return numcodecs.Zstd(level=compressor.level, checksum=compressor.checksum)
    raise ValueError(f"unsupported inner codec {compressor}")


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


def decode_frame(codec: str, frame: memoryview, out: np.ndarray) -> None:
    """Decode one compressed frame of ``codec`` into ``out`` (C-contiguous), size checked first."""
    expected = _blosc_content_size(frame) if codec == "blosc" else _zstd_content_size(frame)
    if expected is not None and expected != out.nbytes:
        raise ValueError(f"chunk decodes to {expected} bytes, expected {out.nbytes}")
    # Decoding needs no settings: blosc and zstd frames carry what they need.
    (numcodecs.Blosc() if codec == "blosc" else numcodecs.Zstd()).decode(frame, out)
