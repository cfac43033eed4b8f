"""Backbones: the TerraFM ViT, its timm factories and released-weight I/O."""

from terrafm_lightning.models.factories import (
    terrafm_base,
    terrafm_large,
    terrafm_small,
    terrafm_tiny,
)
from terrafm_lightning.models.released import export_released_weights, load_released_weights
from terrafm_lightning.models.terrafm import TerraFM

__all__ = [
    "TerraFM",
    "export_released_weights",
    "load_released_weights",
    "terrafm_base",
    "terrafm_large",
    "terrafm_small",
    "terrafm_tiny",
]
