"""The ``terrafm`` command: LightningCLI for pretraining and evaluation, plus backbone export.

``terrafm fit|validate|test|predict --config experiments/<name>.yaml`` runs any module and
datamodule of the package; YAML names them by short class name (``class_path:
TerraFMPretrainModule``). ``terrafm export-backbone --ckpt X --out Y [--student] [--released |
--torchgeo [TASK]]`` writes a pretraining checkpoint's backbone (see
:mod:`terrafm_lightning.ssl.checkpoint`; torchgeo's: :mod:`terrafm_lightning.models.torchgeo`).

User mistakes end with one ``terrafm: error: ...`` line naming the thing and the fix, exit
status 2: the project's own :class:`~terrafm_lightning.errors.UserError` (a missing file, store
or checkpoint, a checkpoint of another model, ...), found anywhere in the exception's cause
chain (jsonargparse wraps a datamodule's error in its "Union subtypes" message), jsonargparse's
parse errors (a misspelt or abbreviated option) and Lightning's ``MisconfigurationException``.
Any other exception is a bug and keeps its traceback; ``--debug`` or ``TERRAFM_DEBUG=1`` shows
the traceback of user mistakes too. Ctrl-C prints one line saying how to resume, exit status
130. LightningCLI has no such mode (it prints the usage, and errors raised in a run are
tracebacks), hence the wrapper in :func:`main`.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

# Imported so LightningCLI resolves their short class names in YAML configs.
import terrafm_lightning.data.datamodule  # noqa: F401
import terrafm_lightning.eval  # noqa: F401
import terrafm_lightning.ssl.prediction  # noqa: F401
import terrafm_lightning.ssl.probe  # noqa: F401
from terrafm_lightning.errors import UserError
from terrafm_lightning.models.checkpoints import read_checkpoint
from terrafm_lightning.models.torchgeo import TASKS as TORCHGEO_TASKS
from terrafm_lightning.models.torchgeo import write_torchgeo_checkpoint
from terrafm_lightning.ssl.checkpoint import (
    checkpoint_architecture,
    export_backbone,
    load_pretraining_backbone,
    released_export_note,
)
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from terrafm_lightning.ssl.student_teacher import MODULE_CLASS_KEY

RUN_VERSION_ENV = "TERRAFM_RUN_VERSION"
"""``<pid>:<version>`` of the launching process, so DDP ranks it starts share the run folder."""

DEBUG_ENV = "TERRAFM_DEBUG"
"""Set to 1 (or pass ``--debug``) to see tracebacks instead of one-line errors."""

SUBCOMMANDS = tuple(LightningCLI.subcommands())
"""LightningCLI's subcommands: fit, validate, test, predict."""

USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ArgumentError,
    MisconfigurationException,
)
"""Exception classes printed as one line: the project's, jsonargparse's and Lightning's."""


class RunInterrupted(Exception):
    """A run stopped by Ctrl-C; the message says how to resume it."""


class TerraFMCLI(LightningCLI):
    """LightningCLI with the package's links, checkpoint checks and one run folder per run."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link evaluation datamodules' task description into the probes at instantiation.

        A link to a parameter the chosen model class lacks is skipped. The pretraining module
        takes the store's class statistics from ``trainer.datamodule`` in its ``setup`` instead,
        so no store is opened while the config is parsed. Each subcommand's parser is kept to
        name the nearest valid option of a refused one.
        """
        for name in ("num_classes", "multilabel", "ignore_index"):
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")
        self.option_parsers = [*getattr(self, "option_parsers", []), parser]

    def parse_arguments(self, parser: LightningArgumentParser, args: list[str] | None) -> None:
        """Parse, naming the nearest valid option of an unknown (or abbreviated) one."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            found = re.match(r"unrecognized arguments: (.*)", str(err))
            unknown = [a.split("=")[0] for a in (found.group(1) if found else "").split()]
            unknown = [a for a in unknown if a.startswith("--")]
            if not unknown:
                raise
            defaults = [p.get_defaults() for p in self.option_parsers]
            valid = {f"--{key}" for d in defaults for key in d.keys()}  # noqa: SIM118 (not iterable)
            near = difflib.get_close_matches(unknown[0], sorted(valid), n=1)
            hint = f"; did you mean {near[0]}?" if near else "; see --help"
            raise UserError(
                f"option {unknown[0]} is not accepted (options are never abbreviated){hint}"
            ) from err

    def before_instantiate_classes(self) -> None:
        """Give all loggers of a run one new version: one run folder, never another run's.

        With several loggers (TensorBoard + CSV) each would pick its own next version; here the
        first free ``version_N`` over all their folders is set on each of them, unless one has
        an explicit ``version`` (other loggers, e.g. W&B run ids, are left alone).
        ``ModelCheckpoint`` without ``dirpath`` then writes into
        ``<save_dir>/<name>/version_N/checkpoints`` of that same run.
        """
        self.new_run_folder = False
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
        self.new_run_folder = True

    def after_instantiate_classes(self) -> None:
        """Create a new run's CSV log folder now, while it is empty.

        The TensorBoard events and ``config.yaml`` go into the same folder first; a CSVLogger
        created after them would warn that its folder "exists and is not empty" on every run.
        """
        if not getattr(self, "new_run_folder", False):
            return
        for logger in self.trainer.loggers:
            if isinstance(logger, CSVLogger):
                _ = logger.experiment  # rank 0 creates the folder (a no-op on other ranks)

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
        written_by = str(hparams.get("_class_path") or ckpt.get(MODULE_CLASS_KEY) or "")
        written_by = written_by.rsplit(".", 1)[-1]
        wanted = str(self.config[subcommand]["model"].get("class_path", "")).rsplit(".", 1)[-1]
        if written_by and wanted and written_by != wanted:
            raise UserError(
                f"--ckpt_path {path} was written by {written_by}, but the config runs {wanted}: "
                f"pass a {wanted} checkpoint (or the config that trained this one)"
            )
        init_args = {k: v for k, v in hparams.items() if k not in ("_instantiator", "_class_path")}
        _check_architecture(path, init_args, self.config[subcommand]["model"].get("init_args"))
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
        """Refuse a checkpoint whose tensors do not fit the model, then run.

        Lightning turns Ctrl-C into ``sys.exit(1)`` after its shutdown; that becomes
        :class:`RunInterrupted`, naming the checkpoint to resume from.
        """
        if self._ckpt_keys is not None and getattr(self.model, "strict_loading", True):
            missing = sorted(set(self.model.state_dict()) - self._ckpt_keys)
            if missing:
                path = self.config[subcommand]["ckpt_path"]
                raise UserError(
                    f"--ckpt_path {path} does not fit {type(self.model).__name__}: it lacks "
                    f"{len(missing)} of its tensors (e.g. {missing[0]}); pass a checkpoint of this "
                    "model and config"
                )
        try:
            super()._run_subcommand(subcommand)
        except SystemExit:
            if not self.trainer.interrupted:
                raise
            raise RunInterrupted(self._resume_hint(subcommand)) from None

    def _resume_hint(self, subcommand: str) -> str:
        if subcommand != "fit":
            return "interrupted; rerun the same command to resume"
        last = [c.last_model_path for c in self.trainer.checkpoint_callbacks]
        last = [p for p in last if p and Path(p).exists()]
        if not last:
            return "interrupted before the first checkpoint; rerun the same command to start again"
        return f"interrupted; rerun the same command with --ckpt_path {last[0]} to resume"


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
    parser.add_argument(
        "--torchgeo",
        nargs="?",
        const="classification",
        choices=TORCHGEO_TASKS,
        help="write the layout torchgeo's trainers take as weights= (default classification; "
        "segmentation for SemanticSegmentationTask(model='dpt', backbone='tu-<factory>'))",
    )
    args = parser.parse_args(argv)
    if args.torchgeo:
        branch = "student" if args.student else "teacher"
        name, kwargs = checkpoint_architecture(read_checkpoint(args.ckpt))
        state = load_pretraining_backbone(args.ckpt, branch).state_dict()
        print(write_torchgeo_checkpoint(name, kwargs, state, args.out, args.torchgeo))
        return
    out = export_backbone(args.ckpt, args.out, args.student, args.released)
    if args.released:
        print(released_export_note(), file=sys.stderr)
    print(out)


ARCHITECTURE_ARGS = (
    "backbone",
    "backbone_kwargs",
    "num_prototypes",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "norm_last_layer",
)
"""Model arguments that decide the checkpoint's tensors: the config may not ask others."""


def _check_architecture(path: str, saved: dict[str, Any], given: Any) -> None:
    """Refuse a config whose architecture differs from the checkpoint's.

    LightningCLI would silently replace the config's value by the checkpoint's.
    """
    if given is None:
        return
    for key in ARCHITECTURE_ARGS:
        if key not in saved or given.get(key) is None:
            continue
        want = given[key].as_dict() if hasattr(given[key], "as_dict") else given[key]
        have = saved[key] or ({} if key == "backbone_kwargs" else saved[key])
        if want != have:
            raise UserError(
                f"--ckpt_path {path} holds a model with {key}={have!r}, the config asks "
                f"{key}={want!r}: run it with the config that trained it (its run folder's "
                f"config.yaml) or set {key} to the checkpoint's value"
            )


def _plan_main(argv: list[str]) -> None:
    from terrafm_lightning.plan import main as plan_main  # it builds the CLI's parser itself

    plan_main(argv)


COMMANDS: dict[str, tuple[str, Callable[[list[str]], None]]] = {
    "export-backbone": (
        "Write a pretraining checkpoint's backbone to a .pth file (or the released layout).",
        _export_main,
    ),
    "plan": (
        "Print a config's memory, FLOPs and throughput per device before a GPU run.",
        _plan_main,
    ),
}
"""Subcommands besides LightningCLI's: name -> (one-line help, entry point given the rest of
the command line). ``terrafm --help`` lists them after LightningCLI's."""


def _first_sentence(function: Callable) -> str:
    return " ".join(inspect.getdoc(function).split()).split(". ")[0].rstrip(".")


def usage() -> str:
    """``terrafm --help``: every subcommand, LightningCLI's and :data:`COMMANDS`, one line each."""
    helps = {name: _first_sentence(getattr(Trainer, name)) for name in SUBCOMMANDS}
    helps |= {name: text for name, (text, _) in COMMANDS.items()}
    width = max(map(len, helps))
    lines = [
        f"usage: terrafm [--debug] {{{','.join(helps)}}} ...",
        "",
        "Pretrain and evaluate TerraFM models (LightningCLI): "
        "`terrafm <subcommand> --help` shows a subcommand's options.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, text in helps.items()),
        "",
        f"--debug (or {DEBUG_ENV}=1) shows the traceback of an error instead of one line.",
    ]
    return "\n".join(lines)


def run_cli(args: list[str]) -> TerraFMCLI:
    """Run the LightningCLI on ``args`` (subcommand first), return it.

    Lightning warns when ``args`` is given while the process has its own options in
    ``sys.argv``; the ``terrafm`` command passes its own, and Python callers (the demo,
    notebooks, tests) pass theirs, so the warning does not apply.
    """
    parser = {"exit_on_error": False, "allow_abbrev": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return TerraFMCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={**parser, **dict.fromkeys(SUBCOMMANDS, parser)},
            args=args,
        )


def user_mistake(err: BaseException) -> BaseException | None:
    """The user mistake behind ``err``: None for a bug.

    The outermost project :class:`UserError` in the cause chain (jsonargparse wraps a class's
    error in its own ``ValueError``), else the innermost jsonargparse or Lightning one (the
    nested parser's error that names the key).
    """
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    ours = [e for e in chain if isinstance(e, UserError)]
    return next(iter(ours or [e for e in chain[::-1] if isinstance(e, USER_ERRORS)]), None)


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
        message = f"option '{key.group(1)}' is not accepted"
        configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config", "-c")]
        line = re.compile(rf"^\s*{re.escape(key.group(1).split('.')[-1])}\s*:", re.M)
        found = [c for c in configs if Path(c).is_file() and line.search(Path(c).read_text())]
        where = f" (in {found[-1]})" if found else " (on the command line)"
        message += f"{where}; check its spelling with --print_config or --help"
    return message


class _DropLightningInterruptNote(logging.Filter):
    """Lightning's "Detected KeyboardInterrupt" note: :func:`main` prints its own line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Detected KeyboardInterrupt" not in record.getMessage()


_DROP_INTERRUPT_NOTE = _DropLightningInterruptNote()


def main(args: list[str] | None = None) -> None:
    """Entry point of ``terrafm`` and ``python -m terrafm_lightning``.

    ``--debug`` anywhere on the command line is taken out before parsing; DDP ranks that
    Lightning starts from ``sys.argv`` see it there too.
    """
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV) == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    # Lightning's rank_zero_info logs through this logger (one filter, however many calls).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_INTERRUPT_NOTE)
    try:
        if argv[0] in COMMANDS:
            COMMANDS[argv[0]][1](argv[1:])
        elif argv[0] in SUBCOMMANDS or argv[0].startswith("-"):
            run_cli(argv)
        else:
            names = ", ".join([*SUBCOMMANDS, *COMMANDS])
            raise UserError(f"unknown subcommand {argv[0]!r}: choose from {names} (see --help)")
    except (KeyboardInterrupt, RunInterrupted) as err:
        if debug:
            raise
        print(f"terrafm: {err or 'interrupted; rerun the same command to resume'}", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:
        mistake = user_mistake(err)
        if debug or mistake is None:
            raise
        print(f"terrafm: error: {_message(mistake, argv)}", file=sys.stderr)
        print(f"  (--debug or {DEBUG_ENV}=1 shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
