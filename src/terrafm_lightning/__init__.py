"""terrafm-lightning: pretrain, evaluate and scale TerraFM-style Earth observation models."""

from terrafm_lightning.modalities import BANDS, MODALITIES

__all__ = ["BANDS", "MODALITIES"]
__version__ = "0.1.0"
