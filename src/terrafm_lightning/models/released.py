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

MAY_BE_MISSING = (PRETRAINING_ONLY_PREFIX, "head.")
"""Model tensors that released weights may lack: the fusion tensors and a new classifier."""


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


def check_released_state(model: TerraFM, state: dict[str, Tensor], source: str) -> list[str]:
    """Check that released weights fit ``model``; return the model tensors they lack.

    Only the pretraining-only fusion tensors and a classifier head (``num_classes`` > 0) may
    be missing; they are reported with a warning.

    Raises:
        ValueError: on weights of another model size (one line naming both), or unexpected,
            missing or wrongly shaped tensors, listing them.
    """
    own = model.state_dict()
    size, own_size = _size(state), _size(own)
    if size != own_size and None not in size:
        raise UserError(
            f"{source} holds a TerraFM of width {size[0]} with {size[1]} blocks; this model has "
            f"width {own_size[0]} with {own_size[1]} blocks: build the matching size "
            "(terrafm_base: 768 / 12, terrafm_large: 1024 / 24)"
        )
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    shapes = [
        f"{k}: release {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing_required = [k for k in missing if not k.startswith(MAY_BE_MISSING)]
    if unexpected or missing_required or shapes:
        raise UserError(
            f"{source}: released weights do not fit this model:"
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  missing: {missing_required}" if missing_required else "")
            + (f"\n  shape mismatch: {shapes}" if shapes else "")
        )
    if missing:
        log.warning("not in the released weights (left initialised): %s", missing)
    return missing


def _size(state: dict[str, Tensor]) -> tuple[int | None, int | None]:
    """(width, number of blocks) of a TerraFM state dict."""
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    blocks = {k.split(".")[1] for k in state if k.startswith("blocks.")}
    return width, len(blocks) or None


def load_released_weights(
    model: TerraFM, path_or_state_dict: str | Path | dict[str, Tensor]
) -> list[str]:
    """Load a released TerraFM state dict into ``model`` strictly.

    Every released tensor must match a model tensor of the same shape; the only model tensors
    allowed to be missing are the pretraining-only fusion tensors (and a classifier head),
    which are left at their initialisation and reported with a warning.

    Args:
        model: a :class:`TerraFM` of the release's size (``terrafm_base`` / ``terrafm_large``).
        path_or_state_dict: a ``.pth`` file (read with ``weights_only=True``) or a state dict.

    Returns:
        The names of the model tensors not in the release (the fusion tensors).

    Raises:
        ValueError: on weights of another size, unexpected, missing or wrongly shaped tensors.
    """
    source = "state dict" if isinstance(path_or_state_dict, dict) else str(path_or_state_dict)
    state = _read_state_dict(path_or_state_dict)
    missing = check_released_state(model, state, source)
    model.load_state_dict(state, strict=False)
    return missing


def released_state_filter(state: dict[str, Tensor], model: TerraFM) -> dict[str, Tensor]:
    """Check released weights for timm's factories (``pretrained_filter_fn``); complete them.

    The release lacks the pretraining-only fusion tensors (and any new classifier); they keep
    the model's initial values, are logged and recorded in ``model.released_missing_keys``.

    Raises:
        ValueError: on weights that do not fit the model (another size, unexpected or wrongly
            shaped tensors).
    """
    state = _read_state_dict(state)
    missing = check_released_state(model, state, "pretrained file")
    model.released_missing_keys = missing
    own = model.state_dict()
    return {**state, **{k: own[k] for k in missing}}


def export_released_weights(model: TerraFM) -> dict[str, Tensor]:
    """State dict of ``model`` in the released layout (fusion tensors dropped).

    Tensors stay on the model's device and share its storage; ``torch.save`` copies them.
    """
    return {
        k: v.detach()
        for k, v in model.state_dict().items()
        if not k.startswith(PRETRAINING_ONLY_PREFIX)
    }
