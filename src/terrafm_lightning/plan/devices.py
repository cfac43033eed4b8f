"""The GPUs the plan sizes for: memory and dense bf16 peak."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """A GPU the plan sizes for."""

    name: str
    memory_gib: float
    bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s."""


DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", 80.0, 989e12),
    "h200": Device("NVIDIA H200 SXM", 141.0, 989e12),
}
