"""Reading torch files safely and building backbones from pretraining checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch

from terrafm_lightning.models.terrafm import TerraFM

log = logging.getLogger(__name__)


def read_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with errors that name the file.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"checkpoint"``).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is corrupt or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(f"{path}: not a readable {what} ({err})") from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is unreadable or has no ``state_dict``.
    """
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: no 'state_dict' (not a Lightning checkpoint)")
    return ckpt


def checkpoint_architecture(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Backbone factory name and keyword arguments from a checkpoint's hyper-parameters."""
    hparams = ckpt.get("hyper_parameters", {})
    return hparams.get("backbone", "terrafm_base"), dict(hparams.get("backbone_kwargs") or {})


def load_pretraining_backbone(
    path: str | Path, branch: str = "teacher", backbone_kwargs: dict[str, Any] | None = None
) -> TerraFM:
    """Build the backbone of a ``TerraFMPretrainModule`` checkpoint and load its weights.

    The architecture comes from the checkpoint's ``hyper_parameters`` (``backbone``,
    ``backbone_kwargs``); ``backbone_kwargs`` given here override non-architectural entries
    such as ``drop_path_rate``.

    Args:
        path: Lightning checkpoint, read with ``torch.load(weights_only=True)``.
        branch: ``"teacher"`` (default, the EMA network used for evaluation) or ``"student"``.
        backbone_kwargs: overrides of the checkpoint's backbone arguments.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is unreadable or lacks the branch's backbone tensors.
    """
    if branch not in ("teacher", "student"):
        raise ValueError(f"checkpoint_branch must be 'teacher' or 'student', got {branch!r}")
    ckpt = read_checkpoint(path)
    name, kwargs = checkpoint_architecture(ckpt)
    kwargs.update(backbone_kwargs or {})
    prefix = f"{branch}.backbone."
    state = {
        k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
    }
    if not state:
        roots = sorted({k.split(".")[0] for k in ckpt["state_dict"]})
        raise ValueError(
            f"{path}: not a TerraFMPretrainModule checkpoint: no '{prefix}*' tensors; "
            f"top-level keys are {roots}"
        )
    model = timm.create_model(name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: {branch} backbone does not fit {name}({kwargs}): {err}") from err
    log.info("loaded %s backbone %s from %s", branch, name, path)
    return model
