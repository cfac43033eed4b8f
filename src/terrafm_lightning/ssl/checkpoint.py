"""The pretraining checkpoint layout, its reader, and the backbone export file.

A ``TerraFMPretrainModule`` checkpoint is a Lightning checkpoint whose ``state_dict`` holds
``student.backbone.*``, ``teacher.backbone.*``, ``student.head.*``, ``teacher.head.*`` and the
centre buffers, and whose ``hyper_parameters`` name the backbone factory (``backbone``) and its
arguments (``backbone_kwargs``).

A backbone export (``terrafm export-backbone``) is a ``torch.save`` dict
``{"format": BACKBONE_FORMAT, "factory": name, "kwargs": {...}, "state_dict": {...}}`` with every
backbone tensor, fusion included, so :func:`load_backbone` rebuilds the same architecture. The
released layout (``--released``) is the bare state dict of the inference-only release, without
the pretraining-only fusion tensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
import torch
from lightning import Callback, LightningModule, Trainer

from terrafm_lightning.models.checkpoints import read_checkpoint, read_torch_file
from terrafm_lightning.models.released import PRETRAINING_ONLY_PREFIX, export_released_weights
from terrafm_lightning.models.terrafm import TerraFM

log = logging.getLogger(__name__)

BACKBONE_FORMAT = "terrafm_lightning.backbone/1"
"""``format`` entry of a backbone export file."""


def checkpoint_architecture(ckpt: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Backbone factory name and keyword arguments from a checkpoint's hyper-parameters."""
    hparams = ckpt.get("hyper_parameters", {})
    return hparams.get("backbone", "terrafm_base"), dict(hparams.get("backbone_kwargs") or {})


def branch_state(ckpt: dict[str, Any], path: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` with the prefix removed.

    Raises:
        ValueError: if there are none (not a pretraining checkpoint), listing the roots found.
    """
    state = {
        k.removeprefix(prefix): v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
    }
    if not state:
        roots = sorted({k.split(".")[0] for k in ckpt["state_dict"]})
        raise ValueError(
            f"{path}: not a TerraFMPretrainModule checkpoint: no '{prefix}*' tensors; "
            f"top-level keys are {roots}"
        )
    return state


def _build(name: str, kwargs: dict[str, Any], state: dict[str, Any], path: str | Path) -> TerraFM:
    model = timm.create_model(name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: backbone does not fit {name}({kwargs}): {err}") from err
    return model


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
    model = _build(name, kwargs, branch_state(ckpt, path, f"{branch}.backbone."), path)
    log.info("loaded %s backbone %s from %s", branch, name, path)
    return model


def export_backbone(
    ckpt: str | Path, out: str | Path, student: bool = False, released: bool = False
) -> Path:
    """Write the teacher (or student) backbone of a pretraining checkpoint.

    Args:
        ckpt: a ``TerraFMPretrainModule`` Lightning checkpoint.
        out: destination file.
        student: export the student instead of the EMA teacher.
        released: write the released layout (fusion tensors dropped, loadable by
            ``load_released_weights``) instead of the full backbone export.

    Returns:
        The written path.

    Raises:
        ValueError: if ``ckpt`` is not a pretraining checkpoint.
    """
    branch = "student" if student else "teacher"
    data = read_checkpoint(ckpt)
    name, kwargs = checkpoint_architecture(data)
    model = load_pretraining_backbone(ckpt, branch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if released:
        _save(export_released_weights(model), out)
    else:
        _save(backbone_payload(name, kwargs, model.state_dict()), out)
    return out


def backbone_payload(
    name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """The backbone export dict of a factory name, its arguments and the backbone's tensors."""
    return {
        "format": BACKBONE_FORMAT,
        "factory": name,
        "kwargs": kwargs,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
    }


def _save(payload: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".partial")
    torch.save(payload, tmp)
    tmp.replace(out)  # never leave a truncated file under the final name


class TeacherWeights(Callback):
    """Teacher-only weights: the teacher backbone as a backbone export, every N epochs.

    Writes ``<checkpoint folder>/teacher.pth`` (the run's ``ModelCheckpoint`` folder, else the
    log folder), replaced atomically; :func:`load_backbone` reads it. A fraction of a full
    checkpoint's size (no student, heads or optimizer state).

    Args:
        every_n_epochs: period in training epochs.
        filename: file name in the folder.
    """

    def __init__(self, every_n_epochs: int = 1, filename: str = "teacher.pth") -> None:
        self.every_n_epochs = every_n_epochs
        self.filename = filename

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Gather the teacher backbone (all ranks) and write it (rank 0)."""
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        state = {
            k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in pl_module.teacher.backbone.state_dict().items()
        }
        if not trainer.is_global_zero:
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.log_dir
        hp = pl_module.hparams
        out = Path(folder) / self.filename
        out.parent.mkdir(parents=True, exist_ok=True)
        _save(backbone_payload(hp.backbone, dict(hp.backbone_kwargs or {}), state), out)


def load_backbone(path: str | Path) -> TerraFM:
    """Rebuild a backbone from a ``terrafm export-backbone`` file (fusion included).

    Raises:
        ValueError: if the file is not a backbone export (e.g. a released-layout file: use
            ``load_released_weights``) or does not fit its recorded architecture.
    """
    data = read_torch_file(path, "backbone export")
    if not isinstance(data, dict) or data.get("format") != BACKBONE_FORMAT:
        raise ValueError(
            f"{path}: not a backbone export of `terrafm export-backbone` (format "
            f"{BACKBONE_FORMAT}); a released-layout file loads with load_released_weights"
        )
    return _build(data["factory"], dict(data["kwargs"]), data["state_dict"], path)


def released_export_note() -> str:
    """What the released layout leaves out (printed by ``export-backbone --released``)."""
    return (
        f"released layout: the pretraining-only fusion tensors ({PRETRAINING_ONLY_PREFIX}*) are "
        "dropped; a model loaded from it fuses modalities with re-initialised fusion tensors"
    )
