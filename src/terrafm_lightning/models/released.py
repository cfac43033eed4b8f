"""Load and export the released TerraFM-B / -L weights (inference-only state dicts)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import Tensor

from terrafm_lightning.errors import UserError
from terrafm_lightning.models.checkpoints import read_torch_file
from terrafm_lightning.models.terrafm import TerraFM

log = logging.getLogger(__name__)

PRETRAINING_ONLY_PREFIX = "patch_embed.fusion."
"""Model tensors absent from the release: the fusion queries, key projection and scorer."""


def _read_state_dict(path_or_state_dict: str | Path | dict[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        state = read_torch_file(path_or_state_dict, "released weights")
    # Some checkpoints wrap the weights ({"model": ...}, {"state_dict": ...}).
    for key in ("model", "state_dict", "teacher"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_released_weights(
    model: TerraFM, path_or_state_dict: str | Path | dict[str, Tensor]
) -> list[str]:
    """Load a released TerraFM state dict into ``model`` strictly.

    Every released tensor must match a model tensor of the same shape; the only model tensors
    allowed to be missing are the pretraining-only fusion tensors, which are left at their
    initialisation and reported with a warning.

    Args:
        model: a :class:`TerraFM` of the release's size (``terrafm_base`` / ``terrafm_large``).
        path_or_state_dict: a ``.pth`` file (read with ``weights_only=True``) or a state dict.

    Returns:
        The names of the model tensors not in the release (the fusion tensors).

    Raises:
        ValueError: on unexpected, missing or wrongly shaped tensors, listing them.
    """
    state = _read_state_dict(path_or_state_dict)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    shapes = [
        f"{k}: release {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing_required = [k for k in missing if not k.startswith(PRETRAINING_ONLY_PREFIX)]
    if unexpected or missing_required or shapes:
        raise UserError(
            "released weights do not fit this model:"
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  missing: {missing_required}" if missing_required else "")
            + (f"\n  shape mismatch: {shapes}" if shapes else "")
        )
    model.load_state_dict(state, strict=False)
    if missing:
        log.warning("not in the released weights (pretraining-only, left initialised): %s", missing)
    return missing


def export_released_weights(model: TerraFM) -> dict[str, Tensor]:
    """State dict of ``model`` in the released layout (fusion tensors dropped).

    Tensors stay on the model's device and share its storage; ``torch.save`` copies them.
    """
    return {
        k: v.detach()
        for k, v in model.state_dict().items()
        if not k.startswith(PRETRAINING_ONLY_PREFIX)
    }
