"""Decoding compressed chunks that already lie on a device: nvCOMP on a GPU, numcodecs on the CPU.

The batch reader's device path (``StoreTileDataset(encoded=True)``) sends each batch's verified
compressed frames (chunk checksums already checked in the worker, then stripped) to the device;
a :class:`DeviceDecoder` turns them into tiles there.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Protocol

import torch

from terrafm_lightning.store.codecs import GPU_CODECS, decode_frame
from terrafm_lightning.store.sharding import ChunkLayout


class DeviceDecoder(Protocol):
    """Decodes compressed frames that already lie on ``device`` into tensors there."""

    device: torch.device

    def decode(
        self, layout: ChunkLayout, frames: Sequence[torch.Tensor], out: Sequence[torch.Tensor]
    ) -> None:
        """Decode each uint8 tensor of ``frames`` into the matching contiguous ``out`` tensor."""


class HostChunkDecoder:
    """The device flow (frames as tensors, decoded into tensors) run on the CPU.

    Used where no GPU decoder applies, and by tests to check the flow tile for tile against
    the workers' CPU decode.
    """

    device = torch.device("cpu")

    def decode(
        self, layout: ChunkLayout, frames: Sequence[torch.Tensor], out: Sequence[torch.Tensor]
    ) -> None:
        """Decode with numcodecs, frame by frame."""
        for frame, target in zip(frames, out, strict=True):
            decode_frame(layout.codec, memoryview(frame.numpy()), target.view(torch.uint8).numpy())


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
        self, layout: ChunkLayout, frames: Sequence[torch.Tensor], out: Sequence[torch.Tensor]
    ) -> None:
        """Decode every frame in one nvCOMP batch straight into ``out``."""
        if layout.codec not in GPU_CODECS:
            raise ValueError(f"nvCOMP cannot decode {layout.codec!r} chunks")
        if not frames:
            return
        nvcomp = self._nvcomp
        targets = [t.view(torch.uint8).reshape(-1) for t in out]
        self._codec.decode(nvcomp.as_arrays(list(frames)), out=nvcomp.as_arrays(targets))


def nvcomp_available() -> bool:
    """True when CUDA and the ``nvidia-nvcomp`` package are present."""
    return torch.cuda.is_available() and importlib.util.find_spec("nvidia.nvcomp") is not None


def device_decoder(codec: str, device: torch.device) -> DeviceDecoder | None:
    """The GPU decoder for ``codec`` on ``device``, or None (decode on the CPU, in the workers)."""
    if device.type == "cuda" and codec in GPU_CODECS and nvcomp_available():
        return NvcompDecoder(device)
    return None
