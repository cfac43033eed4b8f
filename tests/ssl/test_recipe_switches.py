"""Recipe switches through the real ``terrafm`` CLI: stores without WorldCover, compile in DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from terrafm_lightning.cli import main, run_cli
from terrafm_lightning.store.format import consolidate
from terrafm_lightning.store.schema import WORLDCOVER_NODATA
from tests.generators.configs import ROOT, tiny_config
from tests.generators.stores import make_synthetic_store


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def store_without_worldcover(path: Path) -> Path:
    """A synthetic store as prep leaves it without a WorldCover pass: no class statistics."""
    make_synthetic_store(path, 16, 64)
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["class_frequencies"] = {}
    root["worldcover_hist"][:] = 0.0
    root["dominant_class"][:] = WORLDCOVER_NODATA
    consolidate(str(path))
    return path


def test_store_without_worldcover_names_the_one_switch_and_trains_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = store_without_worldcover(tmp_path / "no_worldcover.zarr")
    data = {"samples_per_epoch": 16}
    config = str(tiny_config(store, tmp_path / "dual", data, max_steps=1))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("terrafm: error:")]
    assert errors == [
        f"terrafm: error: dual centring needs WorldCover class frequencies and the store {store} "
        "has none (no WorldCover map): train with --model.init_args.centering dino"
    ]
    out = tmp_path / "dino"
    config = str(tiny_config(store, out, data, max_epochs=1))
    cli = run_cli(["fit", "--config", config, "--model.init_args.centering", "dino"])
    assert cli.trainer.global_step == 2  # 12 training tiles (16 - 4 held out) / batch 8, ceil
    assert set(cli.model.centering.norms()) == {"center_norm"}
    assert cli.model.hparams.class_frequencies == {}
    assert torch.isfinite(cli.trainer.callback_metrics["val/knn_top1"])
