"""The ``terrafm`` CLI end to end on a synthetic store: fit, exact resume after SIGKILL, export."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from terrafm_lightning.cli import export_backbone, main, run_cli
from terrafm_lightning.models import load_released_weights, terrafm_tiny
from tests.generators.stores import make_synthetic_store

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "experiments" / "pretrain_tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "tiny.zarr", 32, 64)


def tiny_config(store: Path, out: Path, **trainer: object) -> Path:
    """The tiny experiment config with its paths moved under ``out``."""
    config = yaml.safe_load(TINY.read_text())
    config["data"]["init_args"]["path"] = str(store)
    config["trainer"].update(
        default_root_dir=str(out), enable_progress_bar=False, enable_model_summary=False, **trainer
    )
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(out)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(out / "checkpoints")
    path = out / "config.yaml"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def step_losses(out: Path) -> dict[int, float]:
    """Per-step training losses of every CSV log under ``out``."""
    losses = {}
    for metrics in sorted(out.glob("lightning_logs/version_*/metrics.csv")):
        with metrics.open() as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def test_print_config_resolves_short_names(store: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tiny_config(store, tmp_path)), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "terrafm_lightning.ssl.module.TerraFMPretrainModule"
    assert printed["data"]["class_path"].endswith("TerraFMDataModule")


@pytest.mark.slow
def test_fit_sigkill_and_exact_resume(store: Path, tmp_path: Path) -> None:
    # Uninterrupted reference run, in-process through the CLI.
    ref_dir = tmp_path / "ref"
    cli = run_cli(["fit", "--config", str(tiny_config(store, ref_dir))])
    model = cli.model
    assert cli.trainer.global_step == 12
    reference = step_losses(ref_dir)
    assert len(reference) == 12 and all(map(torch.isfinite, torch.tensor([*reference.values()])))
    # The store's class statistics reached the model through the CLI links.
    assert model.hparams.high_frequency_classes == cli.datamodule.high_frequency_classes
    assert model.hparams.class_frequencies == cli.datamodule.class_frequencies
    assert (ref_dir / "checkpoints" / "last.ckpt").is_file()

    # Same run in a subprocess, killed with SIGKILL once a mid-epoch checkpoint exists.
    run_dir = tmp_path / "killed"
    config = tiny_config(store, run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "terrafm_lightning", "fit", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    target = run_dir / "checkpoints" / "epoch=0-step=4.ckpt"
    deadline = time.monotonic() + 240
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() else "timeout"
    last = run_dir / "checkpoints" / "last.ckpt"
    while (
        proc.poll() is None
        and time.monotonic() < deadline
        and (not last.exists() or last.stat().st_mtime < target.stat().st_mtime)
    ):
        time.sleep(0.05)
    time.sleep(0.3)  # let the save of last.ckpt finish
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= resumed_from < 12

    cli = run_cli(["fit", "--config", str(config), "--ckpt_path", str(last)])
    assert cli.trainer.global_step == 12
    resumed = {s: v for s, v in step_losses(run_dir).items() if s >= resumed_from}
    after = {s: v for s, v in reference.items() if s >= resumed_from}
    assert len(after) >= 1 and resumed.keys() == after.keys()
    assert resumed == pytest.approx(after, rel=1e-6, abs=1e-7)
    final = cli.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # The teacher backbone exported in the released layout loads into a fresh backbone.
    exported = export_backbone(ref_dir / "checkpoints" / "last.ckpt", tmp_path / "tiny.pth")
    backbone = terrafm_tiny(depth=2)
    missing = load_released_weights(backbone, exported)
    assert missing and all(k.startswith("patch_embed.fusion.") for k in missing)
    teacher = model.teacher.backbone.state_dict()
    for key, value in backbone.state_dict().items():
        if key not in missing:
            torch.testing.assert_close(value, teacher[key])
    with pytest.raises(ValueError, match="not a TerraFMPretrainModule checkpoint"):
        torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
        export_backbone(tmp_path / "other.ckpt", tmp_path / "x.pth")
