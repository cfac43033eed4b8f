"""Optimiser helpers shared by pretraining and fine-tuning: layer-decayed parameter groups.

timm's ``param_groups_layer_decay`` does the grouping; this module only fixes how the package
uses it (TerraFM's ``no_weight_decay`` names under the ``backbone.`` prefix, and the lr scale and
weight-decay flag kept per group so a schedule can set both per step).
"""

from __future__ import annotations

from typing import Any

from timm.optim import param_groups_layer_decay
from torch import nn

from terrafm_lightning.models.terrafm import TerraFM


def layer_decay_groups(
    module: nn.Module, backbone: TerraFM, layer_decay: float
) -> list[dict[str, Any]]:
    """Trainable parameters of ``module`` grouped by layer, for AdamW.

    ``module`` holds ``backbone`` as ``module.backbone`` and has a timm ``group_matcher`` (stem,
    one layer per block, heads on top). Each group has ``lr_scale`` (``layer_decay ** (top -
    layer)``, 1 everywhere when ``layer_decay`` is 1) and ``decay``: False for 1-D tensors
    (norms, biases) and the backbone's ``no_weight_decay()`` tensors. Layers of equal
    ``lr_scale`` and ``decay`` share one group (all of them without layer decay), so a fused
    optimizer steps each group in one call.
    """
    no_decay = [f"backbone.{name}" for name in backbone.no_weight_decay()]
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in param_groups_layer_decay(module, 1.0, no_decay, layer_decay=layer_decay):
        group["decay"] = group.pop("weight_decay") > 0
        key = (group["lr_scale"], group["decay"], group.get("use_fallback", False))
        if key in merged:
            merged[key]["params"] += group["params"]
        else:
            merged[key] = group
    return list(merged.values())
