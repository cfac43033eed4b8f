"""Experiment configs for tests: the tiny CPU recipe with its outputs moved to a test folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "pretrain_tiny_cpu.yaml"


def tiny_config(
    store: Path | str,
    out: Path,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    **trainer: Any,
) -> Path:
    """The tiny experiment config with its outputs under ``out`` and no progress bar.

    Args:
        store: the store the datamodule reads.
        out: folder of the config file and the run's outputs.
        data: datamodule ``init_args`` to override.
        model: model ``init_args`` to override.
        **trainer: trainer arguments to override.
    """
    config = yaml.safe_load(TINY.read_text())
    config["data"]["init_args"].update(path=str(store), **(data or {}))
    config["model"]["init_args"].update(model or {})
    config["trainer"].update(
        default_root_dir=str(out), enable_progress_bar=False, enable_model_summary=False, **trainer
    )
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(out)
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if c["class_path"] != "RichProgressBar"
    ]
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path
