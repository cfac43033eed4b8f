"""``torch.compile`` as a recipe switch: the student's and the teacher's networks, compiled.

``TerraFMPretrainModule(compile=True | "max-autotune" | ...)`` compiles in ``configure_model``,
after FSDP2 sharding and before Lightning wraps the module in DDP: each network is compiled
whole (``fullgraph=True``, static shapes), or, under FSDP2, each FSDP unit's ``forward`` (the
blocks and the head) so the units' gather / reshard hooks stay outside the compiled code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from terrafm_lightning.errors import UserError

if TYPE_CHECKING:
    from terrafm_lightning.ssl.student_teacher import StudentTeacher

COMPILE_MODES: tuple[str, ...] = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
    "lite",
)
"""The ``mode`` values ``torch.compile`` accepts (torch 2.14; a test checks them against torch)."""


def compile_mode(value: bool | str | None) -> str | None:
    """The ``torch.compile`` mode of a ``compile`` setting: None (off), or a mode name.

    Raises:
        ValueError: for a mode torch does not know, naming the accepted values.
    """
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if value not in COMPILE_MODES:
        raise UserError(
            f"compile={value!r} is not a torch.compile mode; use true, false or one of "
            f"{', '.join(COMPILE_MODES)}"
        )
    return value


def compile_networks(nets: Iterable[StudentTeacher], mode: str, per_unit: bool = False) -> None:
    """Compile the backbone and head of each network in place (parameter names unchanged).

    Args:
        nets: student and teacher.
        mode: a ``torch.compile`` mode (:data:`COMPILE_MODES`).
        per_unit: compile each block's and the head's ``forward`` instead of whole networks
            (FSDP2: the units' hooks run eagerly around the compiled code).
    """
    options = {"fullgraph": True, "dynamic": False, "mode": mode}
    for net in nets:
        if per_unit:
            for unit in (*net.backbone.blocks, net.head):
                unit.forward = torch.compile(unit.forward, **options)
        else:
            net.backbone.compile(**options)
            net.head.compile(**options)
