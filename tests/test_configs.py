"""Every YAML in ``experiments/`` parses through the ``terrafm`` parser to its documented settings.

Each file's header names the ``terrafm <subcommand> --config ...`` line that runs it; that line
with ``--print_config`` must succeed from an empty folder (no store, no dataset, no checkpoint on
disk) and give the model, datamodule and key settings below. ``--trainer.enable_progress_bar
false`` (the usual flag on clusters) must be accepted by every recipe: Lightning refuses it when
a progress bar is among the callbacks.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from lightning.pytorch.callbacks import ProgressBar

from terrafm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").glob("*.yaml"))
COMMAND = re.compile(r"^#\s+(?:srun\s+)?terrafm\s+(fit|validate|test|predict)\s+(.*)$", re.M)

PRETRAIN = ("TerraFMPretrainModule", "TerraFMDataModule")
B_RECIPE = {
    "model.init_args.backbone": "terrafm_base",
    "trainer.num_nodes": 8,
    "trainer.devices": 8,
    "trainer.max_epochs": 150,
    "trainer.precision": "bf16-mixed",
    "data.init_args.batch_size": 16,
    "model.init_args.num_prototypes": 65536,
}
L_RECIPE = {
    "model.init_args.backbone": "terrafm_large",
    "trainer.num_nodes": 16,
    "trainer.devices": 8,
    "trainer.max_epochs": 200,
    "trainer.precision": "bf16-mixed",
    "data.init_args.batch_size": 16,
    "data.init_args.global_crop_size": 224,
    "data.init_args.local_crop_size": 96,
    "data.init_args.n_local_crops": 6,
}


def ablation(row: int, centering: str, draw: str) -> dict[str, Any]:
    return {
        **B_RECIPE,
        "model.init_args.centering": centering,
        "data.init_args.modality_draw": draw,
        "data.init_args.path": "data/majortom_200k.zarr",
        "trainer.default_root_dir": f"outputs/{ABLATIONS[row]}",
    }


ABLATIONS = {
    1: "ablation_1_dino_s2l2a",
    2: "ablation_2_modality_aug",
    3: "ablation_3_fusion",
    4: "ablation_4_dual_centering",
}
EXPECTED: dict[str, tuple[str, str, dict[str, Any]]] = {
    ABLATIONS[1]: (
        *PRETRAIN,
        ablation(1, "dino", "all")
        | {
            "data.init_args.modalities": ["s2_l2a"],
            "model.init_args.backbone_kwargs": {"modalities": ["s2_l2a"]},
        },
    ),
    ABLATIONS[2]: (*PRETRAIN, ablation(2, "dino", "one")),
    ABLATIONS[3]: (*PRETRAIN, ablation(3, "dino", "subset")),
    ABLATIONS[4]: (*PRETRAIN, ablation(4, "dual", "subset")),
    "demo": (
        *PRETRAIN,
        {
            "model.init_args.backbone": "terrafm_tiny",
            "model.init_args.backbone_kwargs": {"depth": 4, "img_size": 64},
            "model.init_args.centering": "dual",
            "trainer.accelerator": "cpu",
            "trainer.max_epochs": 20,
            "data.init_args.batch_size": 32,
            "data.init_args.modality_draw": "subset",
        },
    ),
    "pretrain_terrafm_b": (
        *PRETRAIN,
        B_RECIPE
        | {
            "trainer.strategy": "ddp",
            "model.init_args.centering": "dual",
            "model.init_args.lr": 5.0e-4,
            "data.init_args.modality_draw": "subset",
            "data.init_args.path": "data/majortom_core.zarr",
        },
    ),
    "pretrain_terrafm_l": (*PRETRAIN, L_RECIPE | {"trainer.strategy": "ddp"}),
    "pretrain_terrafm_l_fsdp": (
        *PRETRAIN,
        L_RECIPE
        | {
            "trainer.strategy.class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "trainer.strategy.init_args.data_parallel_size": 128,
        },
    ),
    "pretrain_tiny_cpu": (
        *PRETRAIN,
        {
            "model.init_args.backbone": "terrafm_tiny",
            "model.init_args.backbone_kwargs": {"depth": 2},
            "trainer.accelerator": "cpu",
            "trainer.devices": 1,
            "trainer.max_epochs": 2,
            "data.init_args.batch_size": 8,
            "data.init_args.samples_per_epoch": 48,
            "data.init_args.path": "data/synthetic_tiny.zarr",
        },
    ),
    "probe_finetune_eurosat": (
        "FineTune",
        "EuroSATDataModule",
        {"model.init_args.layer_decay": 0.75, "data.init_args.root": "data/EuroSAT_MS"},
    ),
    "probe_knn_geobench": (
        "KNNProbe",
        "GeoBenchDataModule",
        {"model.init_args.k": 20, "model.init_args.temperature": 0.07},
    ),
    "probe_linear_bigearthnet": (
        "LinearProbe",
        "BigEarthNetDataModule",
        {
            "model.init_args.pooling": "cls_mean",
            "data.init_args.modalities": ["s2_l2a", "s1"],
            "data.init_args.img_size": 128,
        },
    ),
    "probe_linear_copernicus": (
        "LinearProbe",
        "CopernicusBenchDataModule",
        {"data.init_args.task": "eurosat_s2"},
    ),
    "probe_linear_eurosat": (
        "LinearProbe",
        "EuroSATDataModule",
        {"model.init_args.pooling": "cls", "data.init_args.modalities": ["s2_l1c"]},
    ),
    "probe_linear_eurosat_sar": (
        "LinearProbe",
        "EuroSATSARDataModule",
        {"data.init_args.modalities": ["s1"]},
    ),
    "probe_linear_geobench": (
        "LinearProbe",
        "GeoBenchDataModule",
        {"data.init_args.partition": "default", "data.init_args.missing_bands": "error"},
    ),
    "probe_seg_sen1floods11": (
        "SegmentationProbe",
        "Sen1Floods11DataModule",
        {"model.init_args.head": "linear", "data.init_args.modalities": ["s1"]},
    ),
    "probe_upernet_geobench": (
        "SegmentationProbe",
        "GeoBenchDataModule",
        {
            "model.init_args.head": "upernet",
            "data.init_args.root": "data/geobench/segmentation_v1.0/m-cashew-plant",
        },
    ),
}


def documented_command(config: Path) -> list[str]:
    """Subcommand and ``--config`` files of the first command line in the config's header."""
    found = COMMAND.search(config.read_text())
    assert found, f"{config.name}: header documents no `terrafm <subcommand> --config` line"
    configs = re.findall(r"--config\s+(\S+)", found.group(2))
    assert f"experiments/{config.name}" in configs, f"{config.name}: header runs another file"
    args = [found.group(1)]
    for path in configs:
        args += ["--config", str(ROOT / path)]
    return args


def value(config: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        config = config[key]
    return config


def test_every_config_has_expectations() -> None:
    assert [c.stem for c in CONFIGS] == sorted(EXPECTED)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_to_its_settings_without_data(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    no_bar = ["--trainer.enable_progress_bar", "false"]
    with pytest.raises(SystemExit) as exit_info:
        main([*documented_command(config), *no_bar, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err[-2000:]
    printed = yaml.safe_load(out)
    model, data, settings = EXPECTED[config.stem]
    assert printed["model"]["class_path"].startswith("terrafm_lightning.")
    assert printed["model"]["class_path"].rsplit(".", 1)[1] == model
    assert printed["data"]["class_path"].startswith("terrafm_lightning.")
    assert printed["data"]["class_path"].rsplit(".", 1)[1] == data
    for key, expected in settings.items():
        assert value(printed, key) == expected, key
    # One run folder per run: every logger writes <default_root_dir>/runs/version_N (the demo
    # keeps its pretraining run apart from its report).
    root = printed["trainer"]["default_root_dir"]
    assert root == f"outputs/{config.stem}"
    loggers = printed["trainer"]["logger"]
    loggers = loggers if isinstance(loggers, list) else [loggers]
    assert [(lg["init_args"]["save_dir"], lg["init_args"]["name"]) for lg in loggers] == [
        (root, "pretrain" if config.stem == "demo" else "runs")
    ] * len(loggers)
    # Lightning refuses enable_progress_bar=False next to a progress bar callback.
    assert printed["trainer"]["enable_progress_bar"] is False
    for callback in printed["trainer"]["callbacks"] or []:
        module, name = callback["class_path"].rsplit(".", 1)
        assert not issubclass(getattr(importlib.import_module(module), name), ProgressBar)
    assert not any(tmp_path.iterdir()), "printing a config wrote files"
