"""DINO's per-parameter gradient clipping: each gradient tensor rescaled on its own."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def clip_per_parameter_(grads: list[Tensor], max_norm: float) -> None:
    """``g *= min(1, max_norm / (||g|| + 1e-6))`` per tensor, in place (DINO's ``clip_gradients``).

    All tensors at once (foreach ops), on the device, without a host sync; a sharded (FSDP2)
    gradient's norm is its full norm.
    """
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scales.unbind())
