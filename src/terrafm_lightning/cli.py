"""The ``terrafm`` command: LightningCLI for pretraining and evaluation, plus backbone export.

``terrafm fit|validate|test|predict --config experiments/<name>.yaml`` runs any module and
datamodule of the package; YAML names them by short class name (``class_path:
TerraFMPretrainModule``). ``terrafm export-backbone --ckpt X --out Y [--student]`` writes a
pretraining checkpoint's backbone in the released-weights layout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so LightningCLI resolves their short class names in YAML configs.
import terrafm_lightning.data.datamodule  # noqa: F401
import terrafm_lightning.eval  # noqa: F401
import terrafm_lightning.ssl.module  # noqa: F401
from terrafm_lightning.models import export_released_weights
from terrafm_lightning.models.checkpoints import load_pretraining_backbone


class TerraFMCLI(LightningCLI):
    """LightningCLI whose datamodule settings flow into the model by argument links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link evaluation datamodules' task description into the probes at instantiation.

        A link to a parameter the chosen model class lacks is skipped. The pretraining module
        takes the store's class statistics from ``trainer.datamodule`` in its ``setup`` instead,
        so no store is opened while the config is parsed.
        """
        for name in ("num_classes", "multilabel", "ignore_index"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")


def export_backbone(ckpt: str | Path, out: str | Path, student: bool = False) -> Path:
    """Write the teacher (or student) backbone of a pretraining checkpoint as released weights.

    Args:
        ckpt: a ``TerraFMPretrainModule`` Lightning checkpoint.
        out: destination ``.pth`` (loadable by ``load_released_weights``).
        student: export the student instead of the EMA teacher.

    Returns:
        The written path.

    Raises:
        ValueError: if ``ckpt`` is not a pretraining checkpoint.
    """
    model = load_pretraining_backbone(ckpt, "student" if student else "teacher")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(export_released_weights(model), out)
    return out


def _export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="terrafm export-backbone",
        description="Write a pretraining checkpoint's backbone in the released-weights layout.",
    )
    parser.add_argument("--ckpt", required=True, help="TerraFMPretrainModule checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output .pth file")
    parser.add_argument(
        "--student", action="store_true", help="export the student, not the teacher"
    )
    args = parser.parse_args(argv)
    print(export_backbone(args.ckpt, args.out, args.student))


def run_cli(args: list[str] | None = None) -> TerraFMCLI:
    """Run the LightningCLI on ``args`` (subcommand first; default ``sys.argv``), return it."""
    return TerraFMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of ``terrafm`` and ``python -m terrafm_lightning``."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export-backbone"]:
        _export_main(argv[1:])
    else:
        run_cli(args)
