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


def _train_losses(out: Path) -> dict[int, float]:
    with (out / "runs" / "version_0" / "metrics.csv").open() as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }


@pytest.mark.slow
def test_compiled_ddp_fit_through_the_cli_equals_eager(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "store.zarr", 32, 64)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
        "OMP_NUM_THREADS": "1",
    }
    losses = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        out = tmp_path / name
        # No drop-path: inductor draws its own random numbers, so only then are losses equal.
        model = {"compile": compile_, "drop_path_rate": 0.0}
        config = tiny_config(store, out, model=model, strategy="ddp", devices=2, max_steps=2)
        done = subprocess.run(
            [sys.executable, "-m", "terrafm_lightning", "fit", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        losses[name] = _train_losses(out)
    assert sorted(losses["compiled"]) == [0, 1]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
