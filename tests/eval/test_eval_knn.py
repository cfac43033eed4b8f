import math

import pytest
import torch
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader

from terrafm_lightning.eval.datasets import EuroSATDataModule
from terrafm_lightning.eval.features import extract_features
from terrafm_lightning.eval.knn import (
    KNNCallback,
    KNNProbe,
    cross_fold_knn,
    knn_evaluate,
    knn_scores,
)
from terrafm_lightning.models import terrafm_tiny
from tests.generators.benchmarks import write_eurosat

TINY = {"backbone": "terrafm_tiny", "backbone_kwargs": {"depth": 2}}


def test_knn_scores_match_the_paper_formula_by_hand():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])
    scores = knn_scores(bank, labels, query, 2, k=2, temperature=0.07)
    # Neighbours: bank 0 (cos 1) and bank 2 (cos 1/sqrt 2); bank 1 (cos 0) is beyond k=2.
    w0, w2 = math.exp(1 / 0.07), math.exp(2**-0.5 / 0.07)
    torch.testing.assert_close(scores, torch.tensor([[w0 / (w0 + w2), w2 / (w0 + w2)]]))
    # k larger than the bank is capped; every row sums to 1.
    assert torch.allclose(knn_scores(bank, labels, query, 2, k=20).sum(1), torch.ones(1))


def test_multilabel_is_one_weighted_vote_per_class():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
    scores = knn_scores(bank, labels, torch.tensor([[1.0, 0.05]]), 3, k=2, multilabel=True)
    assert scores[0, 0] == pytest.approx(1.0)  # both neighbours carry class 0
    assert 0.4 < scores[0, 1] < 0.6 and scores[0, 2] == 0  # one of two; none
    metrics = knn_evaluate(bank, labels, bank[:2], labels[:2], 3, k=1, multilabel=True)
    assert metrics["f1_micro"] == pytest.approx(1.0) and set(metrics) == {
        "f1_micro",
        "f1_macro",
        "map",
    }


def test_knn_evaluate_separable_clusters_and_label_count_check():
    centres = torch.randn(5, 16) * 10
    train_y = torch.arange(5).repeat(20)
    test_y = torch.arange(5).repeat(4)
    train = centres[train_y] + torch.randn(100, 16)
    test = centres[test_y] + torch.randn(20, 16)
    metrics = knn_evaluate(train, train_y, test, test_y, 5)
    assert metrics["top1"] == 1.0
    shuffled = knn_evaluate(train, train_y[torch.randperm(100)], test, test_y, 5)
    assert shuffled["top1"] < 0.6
    with pytest.raises(ValueError, match="100 training features but 99 labels"):
        knn_scores(train, train_y[:99], test, 5)


def test_cross_fold_knn_each_half_queries_the_other():
    # Samples 0, 2, 4 (fold 0) and 1, 3, 5 (fold 1); each fold's nearest labelled point is in
    # the other fold: pairs (0, 1), (2, 3), (4, 5) are close, with labels 0, 1, 2.
    features = torch.tensor(
        [[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0.1, 0.9, 0], [0, 0, 1], [0, 0.1, 0.9]]
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert cross_fold_knn(features, labels, 3, k=1).tolist() == [0, 0, 1, 1, 2, 2]
    assert cross_fold_knn(features, torch.tensor([0, 1, 1, 2, 2, 0]), 3, k=1).tolist() == [
        1, 0, 2, 1, 0, 2
    ]  # fmt: skip
    with pytest.raises(ValueError, match="at least 2 samples, got 1"):
        cross_fold_knn(features[:1], labels[:1], 3)


@pytest.fixture(scope="module")
def eurosat(tmp_path_factory):
    return write_eurosat(tmp_path_factory.mktemp("eurosat"), per_class=3, size=32)


def test_knn_probe_validates_offline_on_eurosat(eurosat):
    dm = EuroSATDataModule(eurosat, batch_size=8)
    probe = KNNProbe(dm.num_classes, dm.multilabel, k=5, **TINY)
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(probe, datamodule=dm, verbose=False)[0]
    assert probe.bank[0].shape == (20, 192)
    bank = extract_features(probe.backbone, DataLoader(dm.datasets["train"], batch_size=8))
    queries = extract_features(probe.backbone, dm.val_dataloader())
    expected = knn_evaluate(*bank, *queries, 10, k=5)
    assert metrics["val/knn/top1"] == pytest.approx(expected["top1"])
    assert metrics["val/knn/f1_macro"] == pytest.approx(expected["f1_macro"])


class _Pretrainer(LightningModule):
    """Stands in for the pretraining module: a teacher with a backbone, and a loss to train."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Module()
        self.teacher.backbone = terrafm_tiny(depth=2)
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_knn_callback_logs_top1_every_n_epochs(eurosat):
    dm = EuroSATDataModule(eurosat, batch_size=8)
    callback = KNNCallback(dm, every_n_epochs=2, k=5)
    calls = []
    original = callback.on_train_epoch_end

    def spy(trainer, module):
        original(trainer, module)
        calls.append(dict(trainer.callback_metrics))

    callback.on_train_epoch_end = spy
    trainer = Trainer(
        max_epochs=2, limit_train_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    module = _Pretrainer()
    trainer.fit(module, train_dataloaders=[{"x": torch.zeros(1)}])
    assert "knn/top1" not in calls[0]  # epoch 1 is skipped with every_n_epochs=2
    bank, queries = (
        extract_features(module.teacher.backbone, getattr(dm, f"{s}_dataloader")())
        for s in ("train", "val")
    )
    assert float(calls[1]["knn/top1"]) == pytest.approx(
        knn_evaluate(*bank, *queries, 10, k=5)["top1"]
    )
    assert module.teacher.backbone.training  # restored after feature extraction
    with pytest.raises(ValueError, match="every_n_epochs"):
        KNNCallback(dm, every_n_epochs=0)


@pytest.mark.slow
def test_knn_bank_gathered_across_two_gloo_ranks_equals_one_process(tmp_path):
    from tests.conftest import run_rank_script

    write_eurosat(tmp_path / "eurosat", per_class=3, size=16)  # 20 train: 10 per rank
    run_rank_script("knn_gather_run.py", tmp_path, 2)
    run_rank_script("knn_gather_run.py", tmp_path, 1)
    rank0, rank1, single = (
        torch.load(tmp_path / f"devices{d}_rank{r}.pt", weights_only=True)
        for d, r in ((2, 0), (2, 1), (1, 0))
    )
    assert single["features"].shape[0] == 20
    for ranked in (rank0, rank1):
        torch.testing.assert_close(ranked["features"], single["features"], rtol=1e-5, atol=1e-5)
        assert torch.equal(ranked["labels"], single["labels"])
        assert ranked["metrics"]["val/knn/top1"] == pytest.approx(single["metrics"]["val/knn/top1"])
