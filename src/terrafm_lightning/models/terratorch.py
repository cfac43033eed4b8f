"""TerraFM backbones in terratorch's backbone registry (extra ``terrafm-lightning[terratorch]``).

Importing this module registers ``terrafm_tiny``, ``terrafm_small``, ``terrafm_base`` and
``terrafm_large`` in ``terratorch.registry.TERRATORCH_BACKBONE_REGISTRY`` (terratorch's own
mechanism for custom modules; from a ``terratorch fit`` YAML, point ``custom_modules_path`` at a
folder whose ``__init__.py`` imports this module). Each builds a :class:`TerraFMBackbone`, which
follows terratorch's backbone contract: ``out_channels`` (one entry per returned block) and a
forward from a tensor or a modality dict (as TerraMind's) to one (B, d, H/16, W/16) feature map
per block.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from terrafm_lightning.models.checkpoints import read_torch_file
from terrafm_lightning.models.released import load_released_weights
from terrafm_lightning.models.terrafm import TerraFM, block_indices
from terrafm_lightning.ssl.checkpoint import BACKBONE_FORMAT


def _import_backbone_registry() -> Any:
    """The terratorch backbone registry, imported without changing torch's matmul precision.

    Importing terratorch 1.2.11's registry runs ``torch.set_float32_matmul_precision("medium")``
    (in its Clay v1.5 backbone module), which lets float32 matmuls run in lower precision for
    the whole process; the caller's setting is restored.
    """
    precision = torch.get_float32_matmul_precision()
    try:
        from terratorch.registry import TERRATORCH_BACKBONE_REGISTRY
    finally:
        torch.set_float32_matmul_precision(precision)
    return TERRATORCH_BACKBONE_REGISTRY


TERRATORCH_BACKBONE_REGISTRY = _import_backbone_registry()

TERRAMIND_NAMES: dict[str, str] = {"S1RTC": "s1", "S2L1C": "s2_l1c", "S2L2A": "s2_l2a"}
"""terratorch / TerraMind modality names accepted as dict keys, and our modality for each."""


class TerraFMBackbone(nn.Module):
    """A TerraFM as a terratorch backbone: one feature map per selected block.

    Args:
        model: the TerraFM.
        out_indices: blocks to return (negative from the end); all blocks if None.
    """

    def __init__(self, model: TerraFM, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.out_indices = block_indices(len(model.blocks), out_indices)
        self.out_channels = [model.embed_dim] * len(self.out_indices)

    def forward(self, x: Tensor | dict[str, Tensor]) -> list[Tensor]:
        """Feature maps (B, d, H/16, W/16) of the selected blocks, in block order.

        Args:
            x: a plain tensor (the model's ``in_chans`` / ``bands`` layout), or a dict of
                modality -> tensor in each stem's band order, keyed by our names (``s1``,
                ``s2_l1c``, ``s2_l2a``) or terratorch's (``S1RTC``, ``S2L1C``, ``S2L2A``).
        """
        if isinstance(x, dict):
            x = {TERRAMIND_NAMES.get(k, k): v for k, v in x.items()}
        return self.model.forward_intermediates(
            x, indices=self.out_indices, intermediates_only=True
        )


def build_backbone(
    name: str,
    pretrained: bool = False,
    ckpt_path: str | Path | None = None,
    out_indices: Sequence[int] | None = None,
    **kwargs: Any,
) -> TerraFMBackbone:
    """Build a :class:`TerraFMBackbone` of the factory ``name``.

    Args:
        name: ``terrafm_tiny|small|base|large``.
        pretrained: download the released weights (base, large) through timm.
        ckpt_path: weights to load: a ``terrafm export-backbone`` file (fusion included) or a
            released-layout file (``TerraFM-B.pth``, or ``export-backbone --released``).
        out_indices: blocks to return; all if None.
        **kwargs: factory arguments (``in_chans``, ``bands``, ``default_modality``, ...).

    Raises:
        ValueError: on weights that do not fit the model.
    """
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if ckpt_path is not None:
        data = read_torch_file(ckpt_path, "TerraFM weights")
        if isinstance(data, dict) and data.get("format") == BACKBONE_FORMAT:
            model.load_state_dict(data["state_dict"])
        else:
            load_released_weights(model, data)
    return TerraFMBackbone(model, out_indices)


@TERRATORCH_BACKBONE_REGISTRY.register
def terrafm_tiny(**kwargs: Any) -> TerraFMBackbone:
    """TerraFM-Ti backbone (see :func:`build_backbone`)."""
    return build_backbone("terrafm_tiny", **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def terrafm_small(**kwargs: Any) -> TerraFMBackbone:
    """TerraFM-S backbone (see :func:`build_backbone`)."""
    return build_backbone("terrafm_small", **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def terrafm_base(**kwargs: Any) -> TerraFMBackbone:
    """TerraFM-B backbone (see :func:`build_backbone`)."""
    return build_backbone("terrafm_base", **kwargs)


@TERRATORCH_BACKBONE_REGISTRY.register
def terrafm_large(**kwargs: Any) -> TerraFMBackbone:
    """TerraFM-L backbone (see :func:`build_backbone`)."""
    return build_backbone("terrafm_large", **kwargs)
