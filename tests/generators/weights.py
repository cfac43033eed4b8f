"""Synthetic weight files: a released-layout checkpoint and a pretraining checkpoint.

Released layout (``TerraFM-*.pth`` keys) at TerraFM-B or TerraFM-Ti width: the key names and
shapes of the release's manifest (``shared/reference/terrafm_checkpoint_keys.json``, TerraFM-B),
for Ti with every width scaled from TerraFM-B's to TerraFM-Ti's (768 -> 192, stem 2304 -> 576,
MLP 3072 -> 768); the values are seeded random. Like the release, it has no fusion tensors.

Pretraining checkpoint: the Lightning checkpoint layout of ``TerraFMPretrainModule``
(``teacher.backbone.*``, ``student.backbone.*``, ``hyper_parameters.backbone``) holding two given
backbone state dicts, for the export commands.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BASE_TO_TINY = {768: 192, 2304: 576, 3072: 768}


def released_state(manifest: Path, tiny: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TerraFM-Ti (or, ``tiny=False``, TerraFM-B) state dict in the released layout."""
    base = json.loads(manifest.read_text())["terrafm_base"]
    scale = BASE_TO_TINY if tiny else {}
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn([scale.get(n, n) for n in shape], generator=generator) * 0.02
        for key, shape in base.items()
    }


def write_released(manifest: Path, out: Path, tiny: bool = True, seed: int = 0) -> Path:
    """Write :func:`released_state` to ``out`` with ``torch.save``."""
    torch.save(released_state(manifest, tiny, seed), out)
    return out


def write_pretraining_checkpoint(
    out: Path,
    name: str,
    teacher: dict[str, torch.Tensor],
    student: dict[str, torch.Tensor],
) -> Path:
    """Write a pretraining checkpoint of the factory ``name`` with the two backbones."""
    state = {f"teacher.backbone.{k}": v for k, v in teacher.items()}
    state |= {f"student.backbone.{k}": v for k, v in student.items()}
    hparams = {"backbone": name, "backbone_kwargs": {}}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, out)
    return out
