from pathlib import Path

import pytest
import torch
import yaml

from terrafm_lightning.cli import main, run_cli
from tests.conftest import shared_path
from tests.generators.benchmarks import write_eurosat, write_sen1floods11

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
QUIET += ["--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"]
TINY = [
    "--model.init_args.backbone",
    "terrafm_tiny",
    "--model.init_args.backbone_kwargs.depth",
    "2",
]


@pytest.mark.parametrize("config", sorted(EXPERIMENTS.glob("probe_*.yaml")), ids=lambda p: p.stem)
def test_every_probe_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("terrafm_lightning.eval.")
    assert printed["data"]["class_path"].endswith("DataModule")


def test_knn_validate_on_real_geobench_samples(tmp_path):
    root = shared_path("data", "geobench_v1", "brick_kiln_v1.0")
    config = EXPERIMENTS / "probe_knn_geobench.yaml"
    args = ["--config", str(config), "--data.init_args.root", str(root), *TINY, *QUIET]
    cli = run_cli(["validate", *args, "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.hparams.num_classes == 2 and not cli.model.hparams.multilabel  # linked
    assert 0 <= float(cli.trainer.callback_metrics["val/knn/top1"]) <= 1


def test_linear_probe_fit_then_test_through_the_cli(tmp_path):
    root = write_eurosat(tmp_path / "eurosat", per_class=2, size=32)
    args = [
        "--config",
        str(EXPERIMENTS / "probe_linear_eurosat.yaml"),
        "--data.init_args.root",
        str(root),
    ]
    args += ["--data.init_args.num_workers", "0", "--data.init_args.img_size", "32", *TINY, *QUIET]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    cli = run_cli(["fit", *args, "--trainer.max_epochs", "1"])
    assert cli.model.hparams.num_classes == 10 and cli.model.head.out_features == 10
    assert "val/top1" in cli.trainer.callback_metrics
    cli = run_cli(["test", *args])
    assert "test/top1" in cli.trainer.callback_metrics


def test_segmentation_probe_links_ignore_index(tmp_path):
    root = write_sen1floods11(tmp_path / "floods")
    args = [
        "--config",
        str(EXPERIMENTS / "probe_seg_sen1floods11.yaml"),
        "--data.init_args.root",
        str(root),
    ]
    args += ["--data.init_args.num_workers", "0", "--trainer.max_epochs", "1", *TINY, *QUIET]
    args += ["--trainer.default_root_dir", str(tmp_path)]
    cli = run_cli(["fit", *args])
    assert cli.model.hparams.ignore_index == -1 and cli.model.hparams.num_classes == 2
    assert "val/miou" in cli.trainer.callback_metrics


def test_test_validate_predict_on_a_probe_checkpoint(tmp_path):
    root = write_eurosat(tmp_path / "eurosat", per_class=2, size=16)
    args = ["--config", str(EXPERIMENTS / "probe_linear_eurosat.yaml")]
    args += ["--data.init_args.root", str(root), "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.img_size", "16", *TINY, "--trainer.logger", "false"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = run_cli(["fit", *args, "--trainer.max_epochs", "1"])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert "ignore_index" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    for command, metric in (("test", "test/top1"), ("validate", "val/top1")):
        cli = run_cli([command, *args, "--ckpt_path", ckpt])
        assert metric in cli.trainer.callback_metrics
    cli = run_cli(["predict", *args, "--ckpt_path", ckpt, "--return_predictions", "true"])
    outputs = cli.trainer.predict_loop.predictions
    embeddings = torch.cat([o["embedding"] for o in outputs])
    assert embeddings.shape == (10, cli.model.backbone.embed_dim)
    assert torch.cat([o["label"] for o in outputs]).tolist() == list(range(10))
