"""The ``terrafm`` CLI end to end on a synthetic store: fit, validate, predict, export, errors."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
import zarr

from terrafm_lightning.cli import COMMANDS, SUBCOMMANDS, main, run_cli, user_mistake
from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.errors import MissingInputError
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.models import load_released_weights, terrafm_tiny
from terrafm_lightning.ssl.checkpoint import export_backbone, load_backbone
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from terrafm_lightning.ssl.probe import TeacherLinearProbe
from terrafm_lightning.ssl.student_teacher import MODULE_CLASS_KEY
from terrafm_lightning.store.format import open_store
from tests.conftest import free_port, s3_options
from tests.generators.benchmarks import write_eurosat
from tests.generators.configs import TINY, tiny_config
from tests.generators.configs import one_line_error as _one_line_error
from tests.generators.stores import make_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "experiments" / "probe_linear_eurosat.yaml"
TERRAFM = str(Path(sys.executable).with_name("terrafm"))
"""The console script installed beside this Python (``pip install -e .``)."""


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_store(tmp_path_factory.mktemp("store") / "tiny.zarr", 32, 64)


def metric_rows(out: Path) -> list[dict[str, str]]:
    """Every CSV metrics row of every run under ``out``."""
    rows = []
    for metrics in sorted(out.glob("runs/version_*/metrics.csv")):
        with metrics.open() as f:
            rows += list(csv.DictReader(f))
    return rows


def step_losses(out: Path) -> dict[int, float]:
    """Per-step training losses of every run under ``out``."""
    return {int(r["step"]): float(r["train/loss"]) for r in metric_rows(out) if r.get("train/loss")}


@pytest.fixture(scope="module")
def trained(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch (6 steps, then validation) through the CLI, counting datamodule setups."""
    out = tmp_path_factory.mktemp("trained")
    config = tiny_config(store, out, max_epochs=1)
    calls: Counter[str] = Counter()
    real = TerraFMDataModule.setup

    def counted(self: TerraFMDataModule, stage: str | None = None) -> None:
        calls[str(getattr(stage, "value", stage))] += 1
        real(self, stage)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(TerraFMDataModule, "setup", counted)
        cli = run_cli(["fit", "--config", str(config)])
    run = out / "runs" / "version_0"
    return {"out": out, "config": config, "cli": cli, "run": run, "setup_calls": calls}


def test_fit_sets_up_once_links_class_statistics_and_fills_one_run_folder(trained) -> None:
    cli, run = trained["cli"], trained["run"]
    assert trained["setup_calls"] == {"fit": 1}
    assert cli.trainer.global_step == 6
    # The store's class statistics reached the model without a parse-time link.
    assert cli.model.hparams.high_frequency_classes == cli.datamodule.high_frequency_classes
    assert cli.model.hparams.class_frequencies == cli.datamodule.class_frequencies
    assert cli.model.peak_lr == pytest.approx(1.6e-2 * 8 / 256)
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == ["best-epoch=0-step=6.ckpt", "last.ckpt", "teacher.pth"]
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    logged = {k for row in metric_rows(trained["out"]) for k, v in row.items() if v}
    assert {"val/loss", "val/knn_top1", "val/knn_rare_top1", "train/lr"} <= logged
    teacher = load_backbone(run / "checkpoints" / "teacher.pth")
    for key, value in cli.model.teacher.backbone.state_dict().items():
        torch.testing.assert_close(teacher.state_dict()[key], value)


def test_a_second_run_gets_its_own_folder(trained, store: Path) -> None:
    first = trained["run"] / "checkpoints" / "last.ckpt"
    before = first.read_bytes()
    cli = run_cli(["fit", "--config", str(trained["config"]), "--trainer.max_steps", "1"])
    assert cli.trainer.global_step == 1
    second = trained["out"] / "runs" / "version_1" / "checkpoints" / "last.ckpt"
    assert second.is_file() and first.read_bytes() == before


def test_validate_from_a_checkpoint_gives_the_fit_metrics(trained) -> None:
    last = trained["run"] / "checkpoints" / "last.ckpt"
    cli = run_cli(["validate", "--config", str(trained["config"]), "--ckpt_path", str(last)])
    fitted = {
        k: float(v)
        for row in metric_rows(trained["out"])
        if row.get("val/knn_top1")
        for k, v in row.items()
        if k.startswith("val/") and v
    }
    got = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    assert got.keys() == {"val/loss", "val/knn_top1", "val/knn_rare_top1"}
    assert got == pytest.approx(fitted, rel=1e-5)


def predict_config(trained: dict[str, Any], output: Path) -> Path:
    config = yaml.safe_load(trained["config"].read_text())
    config["trainer"]["callbacks"].append(
        {
            "class_path": "EmbeddingWriter",
            "init_args": {"output": str(output), "mean_patch_tokens": True, "chunk": 8},
        }
    )
    path = output.parent / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_predict_writes_every_tile_to_zarr_and_resumes(trained, store: Path, tmp_path: Path):
    output = tmp_path / "embeddings.zarr"
    config = predict_config(trained, output)
    last = str(trained["run"] / "checkpoints" / "last.ckpt")
    cli = run_cli(["predict", "--config", str(config), "--ckpt_path", last])
    usable = cli.datamodule.predict_dataset.samples
    ds = xr.open_zarr(output)
    assert ds["cls"].dims == ("sample", "feature") and ds["cls"].shape == (32, 192)
    written = ds["written"].values
    np.testing.assert_array_equal(np.flatnonzero(written), np.sort(usable))
    source = open_store(str(store))
    for name in ("grid_cell", "tile_index", "centre_lat", "centre_lon"):
        np.testing.assert_array_equal(ds[name].values, source[name][:])
    np.testing.assert_array_equal(ds["sample_index"].values, np.arange(32))
    # The rows are the teacher's features of the samples named by the row.
    dm, model = cli.datamodule, cli.model
    batch = dm.on_after_batch_transfer(next(iter(dm.predict_dataloader())), 0)
    with torch.no_grad():
        expected = model.predict_step(batch, 0)
    rows = expected["index"].numpy()
    np.testing.assert_allclose(ds["cls"].values[rows], expected["cls"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        ds["mean_patch"].values[rows], expected["mean_patch"].numpy(), rtol=1e-5, atol=1e-6
    )
    full = ds["cls"].values.copy()
    # A run killed after some batches: unwritten rows are redone, the others left alone.
    root = zarr.open_group(str(output), mode="r+")
    redo = np.sort(usable)[3:11]
    root["written"][redo] = False
    root["cls"][redo] = np.nan
    cli = run_cli(["predict", "--config", str(config), "--ckpt_path", last])
    assert sorted(cli.datamodule.predict_dataset.samples) == redo.tolist()
    np.testing.assert_allclose(xr.open_zarr(output)["cls"].values, full, rtol=1e-5)


def fused_input() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(2, len(BANDS[m]), 32, 32, generator=generator) for m in MODALITIES}
    return inputs, torch.ones(2, 3, dtype=torch.bool)


def test_export_backbone_keeps_fusion_and_released_layout_drops_it(trained, tmp_path, capsys):
    last = trained["run"] / "checkpoints" / "last.ckpt"
    teacher = TerraFMPretrainModule.load_from_checkpoint(last).teacher.backbone.eval()
    full = load_backbone(export_backbone(last, tmp_path / "full.pth")).eval()
    inputs, presence = fused_input()
    with torch.no_grad():
        torch.testing.assert_close(full(inputs, presence), teacher(inputs, presence))
    main(["export-backbone", "--ckpt", str(last), "--out", str(tmp_path / "rel.pth"), "--released"])
    assert "fusion tensors (patch_embed.fusion.*) are dropped" in capsys.readouterr().err
    released = terrafm_tiny(depth=2)
    missing = load_released_weights(released, tmp_path / "rel.pth")
    assert missing and all(k.startswith("patch_embed.fusion.") for k in missing)
    for key, value in released.state_dict().items():
        if key not in missing:
            torch.testing.assert_close(value, teacher.state_dict()[key])
    with pytest.raises(ValueError, match="not a backbone export"):
        load_backbone(tmp_path / "rel.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a TerraFMPretrainModule checkpoint"):
        export_backbone(tmp_path / "other.ckpt", tmp_path / "x.pth")


def test_linear_probe_subclass_loads_a_pretraining_checkpoint(trained, store: Path) -> None:
    import lightning as L

    last = trained["run"] / "checkpoints" / "last.ckpt"
    probe = TeacherLinearProbe.load_from_checkpoint(last, probe_lr=1e-2)
    pretrained = TerraFMPretrainModule.load_from_checkpoint(last).state_dict()
    head = probe.probe.weight.clone()
    dm = TerraFMDataModule(
        str(store), batch_size=8, num_workers=0, global_crop_size=32, local_crop_size=16
    )
    trainer = L.Trainer(
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(probe, datamodule=dm)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/probe_loss"])
    assert not torch.equal(probe.probe.weight, head)
    networks = {k: v for k, v in pretrained.items() if k.startswith(("student.", "teacher."))}
    assert len(networks) == len(probe.state_dict()) - 2  # all but the probe's weight and bias
    for key, value in networks.items():  # student and teacher untouched
        torch.testing.assert_close(probe.state_dict()[key], value, msg=key)


def test_optimizer_flag_builds_that_optimizer_over_the_layer_groups(trained) -> None:
    cli = run_cli(
        [
            "fit",
            "--config",
            str(trained["config"]),
            "--trainer.max_steps",
            "1",
            "--optimizer",
            "SGD",
            "--optimizer.lr",
            "0.1",
            "--optimizer.momentum",
            "0.9",
        ]
    )
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9
    assert all("lr_scale" in g and "decay" in g for g in optimizer.param_groups)


def terrafm(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """The installed ``terrafm`` command, run as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [TERRAFM, *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single ``terrafm: error:`` line of a failed command, which printed no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("terrafm:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def test_mistakes_through_the_command_name_their_real_cause(trained, tmp_path: Path) -> None:
    # The README's probe example without its dataset: the datamodule's own error, not
    # jsonargparse's "Does not validate against any of the Union subtypes".
    result = terrafm("fit", "--config", PROBE, cwd=tmp_path)
    missing = "EuroSATDataModule: dataset folder not found: data/eurosat"
    assert one_line(result) == f"terrafm: error: {missing}"
    assert "Union" not in result.stderr
    # An abbreviated option is refused, naming the nearest valid one.
    result = terrafm("fit", "--config", trained["config"], "--trainer.max_step", "4", cwd=tmp_path)
    assert one_line(result) == (
        "terrafm: error: option --trainer.max_step is not accepted (options are never "
        "abbreviated); did you mean --trainer.max_steps?"
    )
    # A pretraining checkpoint given to a probe config: the checkpoint records its class.
    last = trained["run"] / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)[MODULE_CLASS_KEY] == (
        "terrafm_lightning.ssl.module.TerraFMPretrainModule"
    )
    result = terrafm("validate", "--config", PROBE, "--ckpt_path", last, cwd=tmp_path)
    assert one_line(result) == (
        f"terrafm: error: --ckpt_path {last} was written by TerraFMPretrainModule, but the "
        "config runs LinearProbe: pass a LinearProbe checkpoint (or the config that trained "
        "this one)"
    )
    # A config of another architecture than the checkpoint's: LightningCLI would run the
    # checkpoint's silently.
    result = terrafm(
        "validate", "--config", trained["config"], "--ckpt_path", last,
        "--model.init_args.backbone_kwargs.depth", "3", cwd=tmp_path,
    )  # fmt: skip
    depth = yaml.safe_load(trained["config"].read_text())["model"]["init_args"]["backbone_kwargs"]
    assert one_line(result) == (
        f"terrafm: error: --ckpt_path {last} holds a model with backbone_kwargs={depth!r}, the "
        f"config asks backbone_kwargs={ {**depth, 'depth': 3}!r}: run it with the config that "
        "trained it (its run folder's config.yaml) or set backbone_kwargs to the checkpoint's value"
    )
    assert not any(tmp_path.iterdir()), "a refused command wrote files"


def test_help_lists_every_subcommand(tmp_path: Path) -> None:
    result = terrafm("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("subcommands:\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in table.splitlines()] == [*SUBCOMMANDS, *COMMANDS]
    assert [*SUBCOMMANDS, *COMMANDS] == [
        "fit",
        "validate",
        "test",
        "predict",
        "export-backbone",
        "plan",
    ]
    # No subcommand: the same text on stderr, exit status 2.
    bare = terrafm(cwd=tmp_path)
    assert (bare.returncode, bare.stdout, bare.stderr) == (2, "", result.stdout)


def test_a_bug_keeps_its_traceback(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: TerraFMDataModule, stage: str | None = None) -> None:
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(TerraFMDataModule, "setup", broken)
    with pytest.raises(ValueError, match="a bug, not a user mistake"):
        main(["fit", "--config", str(trained["config"])])
    # jsonargparse wraps an instantiation error in its own ValueError: the cause decides.
    wrapped = ValueError("Does not validate against any of the Union subtypes")
    wrapped.__cause__ = TypeError("a bug in __init__")
    assert user_mistake(wrapped) is None
    wrapped.__cause__ = MissingInputError("X: dataset folder not found: data/x")
    assert user_mistake(wrapped) is wrapped.__cause__


def test_recipe_runs_without_progress_bar_and_ctrl_c_says_how_to_resume(
    store: Path, tmp_path: Path
) -> None:
    """The tiny recipe as shipped, from a fresh folder: no first-run warning, Ctrl-C one line."""
    command = [TERRAFM, "fit", "--config", str(TINY), "--data.init_args.path", str(store)]
    command += ["--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    last = Path("outputs/pretrain_tiny_cpu/runs/version_0/checkpoints/last.ckpt")
    wait_for_checkpoint(proc, tmp_path / last, min_step=2)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1] == (
        f"terrafm: interrupted; rerun the same command with --ckpt_path {last} to resume"
    )
    for noise in ("Traceback", "KeyboardInterrupt", "exists and is not empty", "Error"):
        assert noise not in err, err[-3000:]
    assert torch.load(tmp_path / last, weights_only=True)["global_step"] >= 2


def test_probe_runs_land_in_the_run_folders(tmp_path: Path) -> None:
    root = write_eurosat(tmp_path / "eurosat", per_class=2, size=32)
    args = ["--data.init_args.root", root, "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.img_size", "32", "--model.init_args.backbone", "terrafm_tiny"]
    args += ["--model.init_args.backbone_kwargs.depth", "1", "--trainer.max_epochs", "1"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    result = terrafm("fit", "--config", PROBE, *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exists and is not empty" not in result.stderr
    out = tmp_path / "outputs" / "probe_linear_eurosat"
    assert sorted(p.name for p in out.iterdir()) == ["runs"]
    run = out / "runs" / "version_0"
    assert (run / "metrics.csv").is_file() and list(run.glob("events.out.tfevents.*"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["epoch=0-step=1.ckpt"]


def test_user_mistakes_print_one_line(trained, store: Path, tmp_path: Path, capsys) -> None:
    config = str(trained["config"])
    typo = yaml.safe_load(trained["config"].read_text())
    typo["model"]["init_args"]["num_prototype"] = 64
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((trained["run"] / "checkpoints" / "last.ckpt").read_bytes()[:5000])
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"backbone.w": torch.zeros(1)}, "hyper_parameters": {}}, other)
    probe = tmp_path / "probe.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "x.KNNProbe"}}, probe)
    cases = {
        "num_prototype": ["fit", "--config", config, "--model.init_args.num_prototype", "3"],
        "typo.yaml": ["fit", "--config", str(tmp_path / "typo.yaml")],
        "nothere.yaml": ["fit", "--config", str(tmp_path / "nothere.yaml")],
        "nowhere.zarr": ["fit", "--config", config, "--data.init_args.path", "nowhere.zarr"],
        "truncated.ckpt": ["fit", "--config", config, "--ckpt_path", str(truncated)],
        "other.ckpt": ["validate", "--config", config, "--ckpt_path", str(other)],
        "KNNProbe": ["validate", "--config", config, "--ckpt_path", str(probe)],
        "--lr_scheduler": ["fit", "--config", config, "--lr_scheduler", "ConstantLR"],
    }
    for needle, args in cases.items():
        line = _one_line_error(args, capsys)
        assert needle in line, (needle, line)
    assert "num_prototype" in _one_line_error(cases["typo.yaml"], capsys)
    # Unreachable S3 endpoint (nothing listens on the port).
    s3 = tiny_config(
        "s3://bucket/store.zarr",
        tmp_path / "s3",
        data={"storage_options": s3_options(free_port())},
    )
    assert "s3://bucket/store.zarr" in _one_line_error(["fit", "--config", str(s3)], capsys)
    # --debug shows the real exception instead.
    with pytest.raises(FileNotFoundError, match="truncated|nothere"):
        main(["fit", "--config", config, "--ckpt_path", str(tmp_path / "nothere.ckpt"), "--debug"])


@pytest.mark.slow
def test_fit_sigkill_and_exact_resume(store: Path, tmp_path: Path) -> None:
    # Uninterrupted reference run, in-process through the CLI.
    ref_dir = tmp_path / "ref"
    cli = run_cli(["fit", "--config", str(tiny_config(store, ref_dir))])
    model = cli.model
    assert cli.trainer.global_step == 12
    reference = step_losses(ref_dir)
    assert len(reference) == 12 and all(map(np.isfinite, reference.values()))

    # Same run in a subprocess, killed with SIGKILL once a mid-epoch checkpoint exists.
    run_dir = tmp_path / "killed"
    config = tiny_config(store, run_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "terrafm_lightning", "fit", "--config", str(config)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    last = run_dir / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= resumed_from < 12

    cli = run_cli(["fit", "--config", str(config), "--ckpt_path", str(last)])
    assert cli.trainer.global_step == 12
    assert (run_dir / "runs" / "version_1" / "checkpoints" / "last.ckpt").is_file()
    resumed = {s: v for s, v in step_losses(run_dir).items() if s >= resumed_from}
    after = {s: v for s, v in reference.items() if s >= resumed_from}
    assert len(after) >= 1 and resumed.keys() == after.keys()
    assert resumed == pytest.approx(after, rel=1e-6, abs=1e-7)
    final = cli.model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # SLURM preemption as experiments/slurm/ sets it up (--signal=SIGUSR1 + --requeue): Lightning
    # saves hpc_ckpt_1.ckpt in default_root_dir and calls `scontrol requeue`; SLURM then kills
    # the job and starts the same command again, which restores that checkpoint by itself.
    slurm_dir = tmp_path / "slurm"
    config = tiny_config(store, slurm_dir)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/requeued\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "terrafm-pretrain",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    command = [sys.executable, "-m", "terrafm_lightning", "fit", "--config", str(config)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_checkpoint(proc, slurm_dir / "runs" / "version_0" / "checkpoints" / "last.ckpt", 4)
    proc.send_signal(signal.SIGUSR1)
    hpc = slurm_dir / "hpc_ckpt_1.ckpt"
    wait_for_checkpoint(proc, hpc, min_step=4)
    while not (tmp_path / "requeued").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # SLURM ends the preempted job
    proc.wait()
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    preempted_at = torch.load(hpc, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= preempted_at < 12
    requeued = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    resumed = {s: v for s, v in step_losses(slurm_dir).items() if s >= preempted_at}
    assert resumed == pytest.approx({s: v for s, v in reference.items() if s >= preempted_at})
    final = torch.load(
        slurm_dir / "runs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True
    )["state_dict"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, min_step: int) -> int:
    """Wait until ``path`` holds a complete checkpoint of step >= ``min_step``; its step.

    A distributed checkpoint (a folder) is read through its ``meta.pt``.
    """
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        meta = path / "meta.pt" if path.is_dir() else path
        if meta.exists() and time.time() - meta.stat().st_mtime > 0.5:
            try:
                step = torch.load(meta, map_location="cpu", weights_only=True)["global_step"]
            except Exception:  # caught mid-write
                step = -1
            if step >= min_step:
                return step
        time.sleep(0.1)
    raise AssertionError(proc.stderr.read().decode()[-3000:] if proc.poll() else "timeout")
