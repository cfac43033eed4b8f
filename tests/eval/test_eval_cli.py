from pathlib import Path

import pytest
import torch
import yaml
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from terrafm_lightning.cli import main, run_cli
from terrafm_lightning.eval.features import extract_features
from terrafm_lightning.eval.knn import knn_evaluate
from tests.conftest import shared_path
from tests.generators.benchmarks import pretraining_checkpoint, write_eurosat, write_sen1floods11

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
QUIET += ["--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false"]
TINY = [
    "--model.init_args.backbone",
    "terrafm_tiny",
    "--model.init_args.backbone_kwargs.depth",
    "2",
]


@torch.no_grad()
def outputs(model, loader):
    """The model's logits (at the label grid for segmentation) and labels over a loader."""
    model.eval()
    logits, labels = [], []
    for batch in loader:
        label = batch["label"]
        logits.append(model(batch, label.shape[-2:]) if label.ndim == 3 else model(batch))
        labels.append(label)
    return torch.cat(logits), torch.cat(labels)


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
    dm = cli.datamodule
    bank, queries = (
        extract_features(cli.model.backbone, getattr(dm, f"{s}_dataloader")())
        for s in ("val", "val")  # the real task's train and valid splits are the same 5 samples
    )
    expected = knn_evaluate(*bank, *queries, 2)["top1"]
    assert float(cli.trainer.callback_metrics["val/knn/top1"]) == pytest.approx(expected)


def test_a_checkpoint_of_another_depth_than_the_config_is_refused(tmp_path):
    pretraining_checkpoint(tmp_path / "pre.ckpt")  # depth 2
    root = shared_path("data", "geobench_v1", "brick_kiln_v1.0")
    args = ["validate", "--config", str(EXPERIMENTS / "probe_knn_geobench.yaml")]
    args += ["--data.init_args.root", str(root), "--model.init_args.checkpoint"]
    args += [str(tmp_path / "pre.ckpt"), "--model.init_args.backbone_kwargs", "{depth: 4}", *QUIET]
    with pytest.raises(ValueError) as err:
        run_cli([*args, "--trainer.default_root_dir", str(tmp_path)])
    # jsonargparse wraps the model's error; the CLI prints its cause in one line.
    causes = []
    cause = err.value
    while cause is not None:
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert (
        f"{tmp_path / 'pre.ckpt'}: the checkpoint's backbone has depth=2, backbone_kwargs asks "
        "depth=4; remove depth from backbone_kwargs (the checkpoint sets the architecture) or "
        "give a checkpoint of that architecture"
    ) in causes


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
    logits, labels = outputs(cli.model, cli.datamodule.val_dataloader())
    top1 = MulticlassAccuracy(10, average="micro")(logits, labels)
    assert float(cli.trainer.callback_metrics["val/top1"]) == pytest.approx(float(top1))
    cli = run_cli(["test", *args])
    logits, labels = outputs(cli.model, cli.datamodule.test_dataloader())
    top1 = MulticlassAccuracy(10, average="micro")(logits, labels)
    assert float(cli.trainer.callback_metrics["test/top1"]) == pytest.approx(float(top1))


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
    logits, labels = outputs(cli.model, cli.datamodule.val_dataloader())
    miou = MulticlassJaccardIndex(2, ignore_index=-1)(logits, labels)
    assert float(cli.trainer.callback_metrics["val/miou"]) == pytest.approx(float(miou))


def test_test_validate_predict_on_a_probe_checkpoint(tmp_path):
    root = write_eurosat(tmp_path / "eurosat", per_class=2, size=16)
    args = ["--config", str(EXPERIMENTS / "probe_linear_eurosat.yaml")]
    args += ["--data.init_args.root", str(root), "--data.init_args.num_workers", "0"]
    args += ["--data.init_args.img_size", "16", *TINY, "--trainer.logger", "false"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli = run_cli(["fit", *args, "--trainer.max_epochs", "1"])
    ckpt = cli.trainer.checkpoint_callback.best_model_path
    assert "ignore_index" not in torch.load(ckpt, weights_only=True)["hyper_parameters"]
    for command, metric, split in (("test", "test/top1", "test"), ("validate", "val/top1", "val")):
        cli = run_cli([command, *args, "--ckpt_path", ckpt])
        logits, labels = outputs(cli.model, getattr(cli.datamodule, f"{split}_dataloader")())
        top1 = MulticlassAccuracy(10, average="micro")(logits, labels)
        assert float(cli.trainer.callback_metrics[metric]) == pytest.approx(float(top1))
    cli = run_cli(["predict", *args, "--ckpt_path", ckpt, "--return_predictions", "true"])
    predicted = cli.trainer.predict_loop.predictions
    embeddings = torch.cat([o["embedding"] for o in predicted])
    assert embeddings.shape == (10, cli.model.backbone.embed_dim)
    assert torch.cat([o["label"] for o in predicted]).tolist() == list(range(10))
