"""The ``terrafm_*`` factories in timm's registry, with their pretrained configurations.

Built through timm's ``build_model_with_cfg``, so ``timm.create_model`` handles
``pretrained=True`` (the release on the Hugging Face hub, ``MBZUAI/TerraFM``), a local file
(``pretrained_cfg_overlay=dict(file="TerraFM-B.pth")``), ``features_only=True`` /
``out_indices`` (timm's feature getter over :meth:`TerraFM.forward_intermediates`) and the
classifier arguments. Released weights load through :func:`released_state_filter`: strict,
with the pretraining-only fusion tensors (and a new classifier) kept at their initialisation and
reported.

``pretrained_cfg`` gives ``input_size``, ``mean`` and ``std`` of the plain-tensor layout (by
default the 12 S2 L2A bands with the documented SSL4EO-S12 statistics), so
``timm.data.resolve_model_data_config(model)`` is right, and ``modalities`` the band order, unit
and statistics of every stem.
"""

from __future__ import annotations

import logging
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from terrafm_lightning.bands import band_statistics, input_bands
from terrafm_lightning.modalities import BANDS, SSL4EO_STATS, UNITS
from terrafm_lightning.models.released import released_state_filter
from terrafm_lightning.models.terrafm import TerraFM

log = logging.getLogger(__name__)

SIZES: dict[str, dict[str, int]] = {
    "terrafm_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "terrafm_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "terrafm_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "terrafm_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
"""Width, depth and heads of each factory."""

RELEASE_HUB_ID = "MBZUAI/TerraFM"
"""Hugging Face repository of the released weights (``TerraFM-B.pth``, ``TerraFM-L.pth``)."""


def _cfg(**kwargs: Any) -> dict[str, Any]:
    stats = SSL4EO_STATS["s2_l2a"]
    return {
        "input_size": (len(BANDS["s2_l2a"]), 224, 224),
        "mean": stats["mean"],
        "std": stats["std"],
        "num_classes": 0,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2506.06281",
        "paper_name": "TerraFM: A Scalable Foundation Model for Unified Multisensor Earth "
        "Observation",
        "origin_url": "https://github.com/mbzuai-oryx/TerraFM",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "terrafm_tiny": _cfg(),
        "terrafm_small": _cfg(),
        "terrafm_base.release": _cfg(hf_hub_id=RELEASE_HUB_ID, hf_hub_filename="TerraFM-B.pth"),
        "terrafm_large.release": _cfg(hf_hub_id=RELEASE_HUB_ID, hf_hub_filename="TerraFM-L.pth"),
    }
)


def modality_cfg(model: TerraFM) -> dict[str, dict[str, Any]]:
    """Per stem: band order (the input channel order of a dict input), unit and statistics."""
    return {
        m: {
            "bands": list(BANDS[m]),
            "units": UNITS[m],
            "mean": list(SSL4EO_STATS[m]["mean"]),
            "std": list(SSL4EO_STATS[m]["std"]),
        }
        for m in model.modalities
    }


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    modality, bands = input_bands(
        kwargs.get("in_chans"), kwargs.get("bands"), kwargs.get("default_modality")
    )
    # timm fills in_chans from input_size, so the plain-tensor layout goes into the config.
    kwargs["in_chans"] = len(bands)
    layout = {"input_size": (len(bands), 224, 224), **band_statistics(modality, bands)}
    overlay = {**layout, **(kwargs.pop("pretrained_cfg_overlay", None) or {})}
    model = build_model_with_cfg(
        TerraFM,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=released_state_filter,
        feature_cfg={"feature_cls": "getter"},
        **{**SIZES[variant], **kwargs},
    )
    backbone = getattr(model, "model", model)  # timm's feature getter wraps the model
    extra = {"modalities": modality_cfg(backbone), "bands": list(bands), "modality": modality}
    for m in {id(model): model, id(backbone): backbone}.values():
        m.pretrained_cfg = m.default_cfg = {**m.pretrained_cfg, **extra}
    return model


@register_model
def terrafm_tiny(pretrained: bool = False, **kwargs: Any) -> TerraFM:
    """TerraFM-Ti: d=192, 12 blocks, 3 heads (tests and the CPU demo)."""
    return _create("terrafm_tiny", pretrained, **kwargs)


@register_model
def terrafm_small(pretrained: bool = False, **kwargs: Any) -> TerraFM:
    """TerraFM-S: d=384, 12 blocks, 6 heads."""
    return _create("terrafm_small", pretrained, **kwargs)


@register_model
def terrafm_base(pretrained: bool = False, **kwargs: Any) -> TerraFM:
    """TerraFM-B: d=768, 12 blocks, 12 heads (released weights ``TerraFM-B.pth``)."""
    return _create("terrafm_base", pretrained, **kwargs)


@register_model
def terrafm_large(pretrained: bool = False, **kwargs: Any) -> TerraFM:
    """TerraFM-L: d=1024, 24 blocks, 16 heads (released weights ``TerraFM-L.pth``)."""
    return _create("terrafm_large", pretrained, **kwargs)
