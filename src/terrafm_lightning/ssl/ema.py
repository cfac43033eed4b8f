"""Exponential moving average of the student into the teacher."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student`` over all parameters.

    Both modules must have the same architecture (and the same sharding under FSDP), so their
    parameter lists align. One fused ``lerp`` over all tensors, no copies.
    """
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher has {len(t_params)} parameters, student {len(s_params)}: not the same model"
        )
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
