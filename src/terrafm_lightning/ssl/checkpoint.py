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
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import timm
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.fabric.utilities.cloud_io import get_filesystem

from terrafm_lightning.errors import UserError
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
        raise UserError(
            f"{path}: not a TerraFMPretrainModule checkpoint: no '{prefix}*' tensors; "
            f"top-level keys are {roots}"
        )
    return state


def _build(name: str, kwargs: dict[str, Any], state: dict[str, Any], path: str | Path) -> TerraFM:
    model = timm.create_model(name, **kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: backbone does not fit {name}({kwargs}): {err}") from err
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
        raise UserError(f"checkpoint_branch must be 'teacher' or 'student', got {branch!r}")
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
        raise UserError(
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


def next_hpc_checkpoint(folder: str) -> str:
    """``<folder>/hpc_ckpt_<N + 1>.ckpt`` after the highest N there (1 in a fresh folder).

    The name Lightning's SLURM restore looks for: it resumes from the highest ``hpc_ckpt_N``.
    """
    fs = get_filesystem(folder)
    names = fs.ls(folder, detail=False) if fs.isdir(folder) else []
    found = (re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", os.path.basename(n)) for n in names)
    last = max((int(m.group(1)) for m in found if m), default=0)
    return os.path.join(folder, f"hpc_ckpt_{last + 1}.ckpt")


class SlurmRequeue(Callback):
    """SLURM preemption at an optimizer-step boundary, so the requeued job resumes exactly.

    Lightning's own handler of the requeue signal (``--signal=SIGUSR1@120``) saves
    ``hpc_ckpt_N.ckpt`` wherever the signal lands, mid-batch included, so the requeued job
    skips or repeats part of a batch. This callback replaces that handler: the signal only sets
    a flag; at the next batch end that completes an optimizer step (agreed over all ranks) it
    saves ``<default_root_dir>/hpc_ckpt_N.ckpt``, runs ``scontrol requeue $SLURM_JOB_ID`` on
    rank 0 and stops training. The requeued job restores that checkpoint by itself (Lightning
    picks the newest ``hpc_ckpt_*`` when SLURM is detected and no ``--ckpt_path`` is given).

    Args:
        signal_name: the signal ``sbatch --signal`` sends.
    """

    def __init__(self, signal_name: str = "SIGUSR1") -> None:
        self.signum = signal.Signals[signal_name]
        self._requested = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the handler (after Lightning's, which it replaces)."""
        self._requested = False
        signal.signal(self.signum, self._request)

    def _request(self, signum: int, frame: object) -> None:
        self._requested = True

    def on_train_batch_end(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if not trainer.strategy.reduce_boolean_decision(self._requested, all=False):
            return
        trainer.save_checkpoint(next_hpc_checkpoint(trainer.default_root_dir))
        job = os.environ.get("SLURM_JOB_ID")
        if trainer.is_global_zero and job:
            array = os.environ.get("SLURM_ARRAY_JOB_ID")
            if array:
                job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.call(["scontrol", "requeue", job])
            log.info("scontrol requeue %s: exit status %d", job, result)
        trainer.should_stop = True
