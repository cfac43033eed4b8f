"""Reading torch files safely (``weights_only=True``) with errors that name the file.

The pretraining checkpoint layout and its reader live in :mod:`terrafm_lightning.ssl.checkpoint`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from terrafm_lightning.errors import MissingInputError, UserError


def read_torch_file(path: str | Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with errors that name the file.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"checkpoint"``).

    Raises:
        MissingInputError: if ``path`` does not exist.
        UserError: if the file is corrupt or not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise UserError(f"{path}: not a readable {what} ({err})") from err


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is unreadable or has no ``state_dict``.
    """
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path}: no 'state_dict' (not a Lightning checkpoint)")
    return ckpt
