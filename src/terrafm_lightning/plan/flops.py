"""FLOP formulas of the CPU attention kernels, for ``FlopCounterMode`` on the fake step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def _sdpa_forward_flops(
    query: Sequence[int], key: Sequence[int], value: Sequence[int], *_: Any, **__: Any
) -> int:
    """Two matmuls, ``q k^T`` and ``a v``, for (B, H, S, D) query, key and value."""
    batch, heads, queries, dim = query
    keys, value_dim = key[-2], value[-1]
    return 2 * batch * heads * queries * keys * (dim + value_dim)


def _sdpa_backward_flops(
    grad: Sequence[int],
    query: Sequence[int],
    key: Sequence[int],
    value: Sequence[int],
    *_: Any,
    **__: Any,
) -> int:
    """Four matmuls (gradients of v, the scores, q and k): twice the forward."""
    return 2 * _sdpa_forward_flops(query, key, value)


aten = torch.ops.aten
SDPA_FLOPS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward_flops,
}
"""FLOP formulas of the CPU attention kernels, which ``FlopCounterMode`` does not know (its
formulas for the CUDA kernels count the same matmuls)."""
