"""The shared base of modules that hold a TerraFM student and its EMA teacher.

:class:`StudentTeacherModule` builds both networks from its hyper-parameters (so
``Subclass.load_from_checkpoint`` rebuilds a pretraining checkpoint's networks), keeps the
teacher frozen in eval mode, shards them under FSDP2, compiles them (``compile``) and turns on
activation checkpointing in the student (``grad_checkpointing``). Subclasses add what they train:
:class:`~terrafm_lightning.ssl.module.TerraFMPretrainModule` (DINO) and
:class:`~terrafm_lightning.ssl.probe.TeacherLinearProbe` (a linear probe on the frozen teacher).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import lightning as L
import timm
from torch import Tensor, nn

from terrafm_lightning.batch import TileView
from terrafm_lightning.errors import UserError
from terrafm_lightning.models import TerraFM
from terrafm_lightning.models.terrafm import layer_group_matcher
from terrafm_lightning.ssl.compile import compile_mode, compile_networks
from terrafm_lightning.ssl.distributed import shard_student_teacher
from terrafm_lightning.ssl.head import DINOHead

MODULE_CLASS_KEY = "module_class"
"""Checkpoint key of the writing module's ``<module>.<class>`` (its ``_class_path`` is not kept)."""


class StudentTeacher(nn.Module):
    """A backbone and its DINO head (the student or the teacher)."""

    def __init__(self, backbone: TerraFM, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Timm layer groups: stem, one per block (final norm with the last), head on top."""
        return layer_group_matcher("backbone.")


def checkpointing_period(value: bool | int) -> int:
    """Block period of a ``grad_checkpointing`` setting: 0 (off), 1 (every block) or k.

    Raises:
        ValueError: for a negative or non-integer value.
    """
    if value is True or value is False:
        return int(value)
    if not isinstance(value, int) or value < 0:
        raise UserError(
            f"grad_checkpointing={value!r}: use true (every block), false, or k >= 1 "
            "(every k-th block)"
        )
    return value


class StudentTeacherModule(L.LightningModule):
    """Student and EMA-teacher TerraFM networks with DINO heads; the teacher stays frozen.

    Args:
        backbone: backbone factory name (``terrafm_tiny|small|base|large``, timm registry).
        backbone_kwargs: extra factory arguments (e.g. ``depth``, ``modalities``).
        drop_path_rate: stochastic depth of the student (the teacher has none).
        num_prototypes: K of the DINO head.
        head_hidden_dim: DINO head MLP width.
        head_bottleneck_dim: DINO head bottleneck width.
        norm_last_layer: fix the prototype norms to 1 (DINO's ``norm_last_layer``).
        compile: ``torch.compile`` student and teacher (backbones and heads, ``fullgraph``):
            ``false`` (default), ``true`` (mode ``default``) or a mode name such as
            ``max-autotune`` (see :mod:`terrafm_lightning.ssl.compile`).
        grad_checkpointing: activation checkpointing of the student's blocks: ``true`` (every
            block) or k (every k-th block); recomputed in backward, same values and gradients.
            The teacher runs without gradients and never checkpoints.
    """

    def __init__(
        self,
        backbone: str = "terrafm_base",
        backbone_kwargs: dict[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        num_prototypes: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        compile: bool | str = False,
        grad_checkpointing: bool | int = False,
    ) -> None:
        super().__init__()
        # Every argument of the subclasses' __init__ chain too (Lightning walks the frames).
        self.save_hyperparameters()
        self._compile_mode = compile_mode(compile)
        every = checkpointing_period(grad_checkpointing)
        kwargs = dict(backbone_kwargs or {})
        if "grad_checkpointing" in kwargs:
            raise UserError(
                "backbone_kwargs.grad_checkpointing would reach the teacher, which runs without "
                "gradients: use model.init_args.grad_checkpointing (the student's blocks)"
            )

        def make(drop_path: float) -> StudentTeacher:
            net = timm.create_model(backbone, **{**kwargs, "drop_path_rate": drop_path})
            head = DINOHead(
                net.embed_dim, num_prototypes, head_hidden_dim, head_bottleneck_dim, norm_last_layer
            )
            return StudentTeacher(net, head)

        self.student = make(drop_path_rate)
        self.teacher = make(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        if every:
            self.student.backbone.set_grad_checkpointing(True, every=every)

    @classmethod
    def network_arguments(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The entries of ``hparams`` that are arguments of this base (the networks')."""
        names = inspect.signature(StudentTeacherModule.__init__).parameters
        return {k: v for k, v in hparams.items() if k in names and k != "self"}

    def configure_model(self) -> None:
        """Shard (under ``ModelParallelStrategy``), then compile (``compile``) both networks.

        Runs before Lightning wraps the module in DDP, so DDP sees the compiled networks; under
        other strategies than ``ModelParallelStrategy`` nothing is sharded here (``FSDPStrategy``
        wraps by its own policy).

        Raises:
            ValueError: if activation checkpointing was turned on in the teacher.
        """
        if getattr(self.teacher.backbone, "grad_checkpointing", 0):
            raise UserError(
                "grad_checkpointing is on in the teacher, which runs without gradients: turn it "
                "off there and use model.init_args.grad_checkpointing (the student's blocks)"
            )
        mesh = self.device_mesh
        if mesh is not None:
            shard_student_teacher(self.student, self.teacher, mesh["data_parallel"])
        if self._compile_mode is not None:
            compile_networks((self.student, self.teacher), self._compile_mode, mesh is not None)

    def train(self, mode: bool = True) -> StudentTeacherModule:
        """Set train/eval mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def predict_step(self, batch: TileView, batch_idx: int) -> dict[str, Tensor]:
        """Teacher CLS and mean patch token of whole-tile views, with the store sample index."""
        tokens = self.teacher.backbone.forward_features(batch["inputs"], batch["presence"])
        return {"index": batch["index"], "cls": tokens[:, 0], "mean_patch": tokens[:, 1:].mean(1)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep plain hyper-parameters only.

        LightningCLI records its instantiator and the class path; every argument of these
        modules is a plain value, and with them ``Subclass.load_from_checkpoint`` (probes)
        would be refused. The writing class is kept under :data:`MODULE_CLASS_KEY` instead, for
        the CLI's check that ``--ckpt_path`` fits the config's model.
        """
        hparams = checkpoint.get("hyper_parameters", {})
        hparams.pop("_instantiator", None)
        hparams.pop("_class_path", None)
        checkpoint[MODULE_CLASS_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
