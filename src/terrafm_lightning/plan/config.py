"""A ``terrafm fit`` config read for the plan: its classes, precision, strategy and devices.

The config is parsed by LightningCLI as ``terrafm fit`` parses it, without building anything.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.precision import (
    DoublePrecision,
    HalfPrecision,
    MixedPrecision,
    Precision,
)

from terrafm_lightning.errors import MissingInputError, UserError

PRECISION_ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
SHARDED_STRATEGIES = ("ModelParallelStrategy", "FSDPStrategy")


def precision_plugin(precision: str | int | None) -> Precision:
    """Lightning's precision plugin of a ``trainer.precision`` value, on CPU."""
    value = str(precision if precision is not None else "32-true")
    value = PRECISION_ALIASES.get(value, value)
    if value in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(value, device="cpu")
    if value in ("bf16-true", "16-true"):
        return HalfPrecision(value)
    if value == "64-true":
        return DoublePrecision()
    if value == "32-true":
        return Precision()
    raise UserError(
        f"trainer.precision {precision!r} cannot be planned: use 32-true, bf16-mixed, 16-mixed, "
        "bf16-true or 16-true"
    )


@dataclass(frozen=True)
class Strategy:
    """How a strategy places the training state on ``devices`` devices."""

    name: str
    devices: int
    sharded: bool
    ddp_buckets: bool

    @property
    def shards(self) -> int:
        """Ways the parameters, gradients and optimizer state are split."""
        return self.devices if self.sharded else 1


def parse_strategy(strategy: Any, devices: int) -> Strategy:
    """The :class:`Strategy` of a ``trainer.strategy`` value (a name or a class config)."""
    init: Mapping[str, Any] = {}
    if isinstance(strategy, str) or strategy is None:
        name = strategy or "auto"
    else:
        name = str(strategy["class_path"]).rsplit(".", 1)[-1]
        init = dict(strategy.get("init_args") or {})
    if name.endswith(SHARDED_STRATEGIES) or name.startswith("fsdp"):
        tensor_parallel = init.get("tensor_parallel_size", 1)
        if tensor_parallel not in (1, "auto"):
            raise UserError(
                f"trainer.strategy {name} with tensor_parallel_size {tensor_parallel} cannot be "
                "planned: the plan shards over data-parallel devices only (set it to 1)"
            )
        return Strategy(f"FSDP over {devices} devices", devices, True, False)
    if name.startswith("deepspeed") or "DeepSpeed" in name:
        raise UserError(f"trainer.strategy {name} cannot be planned: use ddp or FSDP")
    ddp = name.startswith("ddp") or name.endswith("DDPStrategy") or devices > 1
    buckets = ddp and not init.get("gradient_as_bucket_view", False)
    label = f"DDP over {devices} devices" if ddp else "one device"
    return Strategy(label, devices, False, buckets)


class _ConfigOnly(LightningCLI):
    """LightningCLI that parses a config (short class names included) and builds nothing."""

    def before_instantiate_classes(self) -> None:
        """Nothing runs, so no run folder either."""

    def instantiate_classes(self) -> None:
        """The plan builds the model itself, on fake tensors."""


def read_config(path: str | Path) -> Any:
    """Parse a ``terrafm fit`` config as the CLI does; returns its namespace."""
    if not Path(path).is_file():
        raise MissingInputError(f"config {path} not found")
    import terrafm_lightning.cli  # noqa: F401  (registers every class the CLI resolves)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = _ConfigOnly(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", str(path)],
            parser_kwargs={"exit_on_error": False},
        )
    return cli.config


def section_class(config: Any, key: str, expected: type, path: str | Path) -> tuple[type, dict]:
    """The class and init arguments of ``config[key]``, which must subclass ``expected``."""
    section = config.get(key)
    class_path = str(section["class_path"]) if section else ""
    module, _, name = class_path.rpartition(".")
    cls = getattr(sys.modules.get(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, expected)):
        raise UserError(
            f"{path}: {key} is {name or 'missing'}; terrafm plan takes a pretraining config "
            f"({key}: {expected.__name__})"
        )
    init = section.get("init_args")
    return cls, (init.as_dict() if hasattr(init, "as_dict") else dict(init or {}))


def run_devices(trainer: Any, path: str | Path) -> int:
    """Devices of the run: ``trainer.devices`` x ``trainer.num_nodes``."""
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or devices < 1:
        raise UserError(
            f"{path}: trainer.devices is {devices!r}; pass --devices N (devices of the whole run)"
        )
    return devices * int(nodes)


def init_defaults(cls: type) -> dict[str, Any]:
    """Default values of ``cls.__init__``'s arguments."""
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
