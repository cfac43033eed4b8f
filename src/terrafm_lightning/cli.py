"""The ``terrafm`` command: LightningCLI for pretraining and evaluation, plus backbone export.

``terrafm fit|validate|test|predict --config experiments/<name>.yaml`` runs any module and
datamodule of the package; YAML names them by short class name (``class_path:
TerraFMPretrainModule``). ``terrafm export-backbone --ckpt X --out Y [--student] [--released]``
writes a pretraining checkpoint's backbone (see :mod:`terrafm_lightning.ssl.checkpoint`).

User mistakes (a config key typo, a missing file, store or checkpoint, a checkpoint of another
model, an unreachable S3 endpoint) end with one ``terrafm: error: ...`` line naming the thing
and the fix, exit status 2; ``--debug`` or ``TERRAFM_DEBUG=1`` shows the traceback instead.
LightningCLI has no such mode (it prints the usage, and errors raised in a run are tracebacks),
hence the wrapper in :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Imported so LightningCLI resolves their short class names in YAML configs.
import terrafm_lightning.data.datamodule  # noqa: F401
import terrafm_lightning.eval  # noqa: F401
import terrafm_lightning.ssl.prediction  # noqa: F401
import terrafm_lightning.ssl.probe  # noqa: F401
from terrafm_lightning.models.checkpoints import read_checkpoint
from terrafm_lightning.ssl.checkpoint import export_backbone, released_export_note
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from terrafm_lightning.store.format import StoreError

RUN_VERSION_ENV = "TERRAFM_RUN_VERSION"
"""``<pid>:<version>`` of the launching process, so DDP ranks it starts share the run folder."""

DEBUG_ENV = "TERRAFM_DEBUG"
"""Set to 1 (or pass ``--debug``) to see tracebacks instead of one-line errors."""

SUBCOMMANDS = ("fit", "validate", "test", "predict")


class UserError(Exception):
    """A mistake in the command line, config or inputs; printed as one line."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ArgumentError,
    StoreError,
    FileNotFoundError,
    ValueError,
)


class TerraFMCLI(LightningCLI):
    """LightningCLI with the package's links, checkpoint checks and one run folder per run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link evaluation datamodules' task description into the probes at instantiation.

        A link to a parameter the chosen model class lacks is skipped. The pretraining module
        takes the store's class statistics from ``trainer.datamodule`` in its ``setup`` instead,
        so no store is opened while the config is parsed.
        """
        for name in ("num_classes", "multilabel", "ignore_index"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Give all loggers of a run one new version: one run folder, never another run's.

        With several loggers (TensorBoard + CSV) each would pick its own next version; here the
        first free ``version_N`` over all their folders is set on each of them, unless one has
        an explicit ``version`` (other loggers, e.g. W&B run ids, are left alone).
        ``ModelCheckpoint`` without ``dirpath`` then writes into
        ``<save_dir>/<name>/version_N/checkpoints`` of that same run.
        """
        config = self.config.get(str(self.subcommand), self.config)
        loggers = (config.get("trainer") or {}).get("logger")
        loggers = loggers if isinstance(loggers, list) else [loggers]
        args = [
            lg.init_args
            for lg in loggers
            if str(getattr(lg, "class_path", "")).endswith(("TensorBoardLogger", "CSVLogger"))
        ]
        if not args or any(a.get("version") is not None for a in args):
            return
        parent, _, inherited = os.environ.get(RUN_VERSION_ENV, "").partition(":")
        child = os.environ.get("LOCAL_RANK", "0") != "0" and parent == str(os.getppid())
        if child and inherited:
            version = int(inherited)  # a DDP rank started by the run's launcher
        else:
            taken = [
                int(p.name.removeprefix("version_"))
                for a in args
                for p in Path(a.get("save_dir") or ".", a.get("name") or "lightning_logs").glob(
                    "version_*"
                )
                if p.name.removeprefix("version_").isdigit()
            ]
            version = max(taken, default=-1) + 1
            os.environ[RUN_VERSION_ENV] = f"{os.getpid()}:{version}"
        for a in args:
            a["version"] = version

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path``, then load its hyper-parameters into the config.

        The file must be a readable Lightning checkpoint of the config's model class; its
        hyper-parameters then override the config's model arguments, as in LightningCLI.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        self._ckpt_keys: set[str] | None = None
        if not path or path in ("last", "best", "hpc") or Path(path).is_dir():
            # Named checkpoints and distributed-checkpoint folders are Lightning's to resolve.
            return super()._parse_ckpt_path()
        ckpt = read_checkpoint(path)
        self._ckpt_keys = set(ckpt["state_dict"])
        hparams = ckpt.get("hyper_parameters") or {}
        written_by = str(hparams.get("_class_path", "")).rsplit(".", 1)[-1]
        wanted = str(self.config[subcommand]["model"].get("class_path", "")).rsplit(".", 1)[-1]
        if written_by and wanted and written_by != wanted:
            raise UserError(
                f"--ckpt_path {path} was written by {written_by}, but the config runs {wanted}: "
                f"pass a {wanted} checkpoint (or the config that trained this one)"
            )
        init_args = {k: v for k, v in hparams.items() if k not in ("_instantiator", "_class_path")}
        if init_args:
            model = {"class_path": self.config[subcommand]["model"]["class_path"]}
            model["init_args"] = init_args
            self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """``--optimizer`` for the pretraining module: its class over the module's layer groups.

        ``--lr_scheduler`` is refused there: the module schedules lr, weight decay, EMA momentum
        and teacher temperature per step itself.
        """
        if not isinstance(self.model, TerraFMPretrainModule):
            return super()._add_configure_optimizers_method_to_model(subcommand)
        config = self.config_init.get(str(subcommand), self.config_init)
        if config.get("lr_scheduler"):
            raise UserError(
                "--lr_scheduler does not apply to TerraFMPretrainModule, which schedules lr, "
                "weight decay and EMA per step: set model.init_args.lr / min_lr / warmup_epochs"
            )
        optimizer = config.get("optimizer")
        if optimizer:
            self.model.optimizer_init = optimizer.as_dict()

    def _run_subcommand(self, subcommand: str) -> None:
        """Refuse a checkpoint whose tensors do not fit the model, before the run starts."""
        if self._ckpt_keys is not None and getattr(self.model, "strict_loading", True):
            missing = sorted(set(self.model.state_dict()) - self._ckpt_keys)
            if missing:
                path = self.config[subcommand]["ckpt_path"]
                raise UserError(
                    f"--ckpt_path {path} does not fit {type(self.model).__name__}: it lacks "
                    f"{len(missing)} of its tensors (e.g. {missing[0]}); pass a checkpoint of this "
                    "model and config"
                )
        super()._run_subcommand(subcommand)


def _export_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="terrafm export-backbone",
        description="Write a pretraining checkpoint's backbone (fusion included, with its "
        "factory name and arguments), or with --released the released-weights layout.",
    )
    parser.add_argument("--ckpt", required=True, help="TerraFMPretrainModule checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="output .pth file")
    parser.add_argument(
        "--student", action="store_true", help="export the student, not the teacher"
    )
    parser.add_argument(
        "--released",
        action="store_true",
        help="write the released layout (load_released_weights); drops the fusion tensors",
    )
    args = parser.parse_args(argv)
    out = export_backbone(args.ckpt, args.out, args.student, args.released)
    if args.released:
        print(released_export_note(), file=sys.stderr)
    print(out)


def run_cli(args: list[str] | None = None) -> TerraFMCLI:
    """Run the LightningCLI on ``args`` (subcommand first; default ``sys.argv``), return it.

    Python callers (the demo, notebooks) pass ``args`` while their own process has options in
    ``sys.argv``; Lightning's warning against mixing the two does not apply to them.
    """
    one_line = {"exit_on_error": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return TerraFMCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**one_line, **dict.fromkeys(SUBCOMMANDS, one_line)},
            args=args,
        )


def _message(err: BaseException, argv: list[str]) -> str:
    """The first meaningful line of an error, naming the config file of a rejected key."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0] if lines else type(err).__name__
    for line in lines[1:]:  # jsonargparse: 'Parser key "x":' then the reason below
        if not message.endswith(":"):
            break
        message = f"{message} {line.lstrip('- ')}"
    if not isinstance(err, ArgumentError):
        return message
    key = re.search(r"(?:Option|Key) ['\"]([^'\"]+)['\"] is not accepted", str(err))
    if key:
        message = f"{message.split(':')[0]}: option '{key.group(1)}' is not accepted"
        configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
        line = re.compile(rf"^\s*{re.escape(key.group(1).split('.')[-1])}\s*:", re.M)
        found = [c for c in configs if Path(c).is_file() and line.search(Path(c).read_text())]
        where = f" (in {found[-1]})" if found else " (on the command line)"
        message += f"{where}; check its spelling with --print_config or --help"
    return message


def main(args: list[str] | None = None) -> None:
    """Entry point of ``terrafm`` and ``python -m terrafm_lightning``."""
    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:
        # The environment reaches DDP ranks that Lightning relaunches from sys.argv.
        os.environ[DEBUG_ENV] = "1"
        argv.remove("--debug")
        if args is None:
            sys.argv.remove("--debug")
    debug = os.environ.get(DEBUG_ENV) == "1"
    try:
        if argv[:1] == ["export-backbone"]:
            _export_main(argv[1:])
        elif argv[:1] == ["plan"]:
            from terrafm_lightning.plan import main as plan_main  # imports the CLI itself

            plan_main(argv[1:])
        else:
            run_cli(argv if args is not None else None)
    except USER_ERRORS as err:
        if debug:
            raise
        cause: Any = err
        while cause.__cause__ is not None and not str(cause):
            cause = cause.__cause__
        print(f"terrafm: error: {_message(cause, argv)}", file=sys.stderr)
        print(f"  (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
