"""Experiment configs for tests: the tiny CPU recipe on a test store; the one-line error check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from terrafm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "pretrain_tiny_cpu.yaml"


def tiny_config(
    store: Path | str,
    out: Path,
    data: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    callbacks: list[dict[str, Any]] | None = None,
    **trainer: Any,
) -> Path:
    """The tiny experiment config with its outputs under ``out`` and no progress bar.

    Args:
        store: the store the datamodule reads.
        out: folder of the config file and the run's outputs.
        data: datamodule ``init_args`` to override.
        model: model ``init_args`` to override.
        callbacks: callbacks appended to the recipe's.
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
    config["trainer"]["callbacks"] += list(callbacks or [])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """Run ``terrafm args``; assert it exits 2 with one error line and no traceback; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    assert "Traceback" not in err and "usage:" not in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("terrafm: error:")]
    assert len(errors) == 1, err[-2000:]
    return errors[0]
