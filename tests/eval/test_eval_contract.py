"""One contract over every exported evaluation datamodule (timm's ``test_models.py`` idea)."""

import pytest
import torch

import terrafm_lightning.eval.datasets as datasets
from terrafm_lightning.batch import EvalBatch
from terrafm_lightning.modalities import BANDS, MODALITIES
from tests.generators.benchmarks import (
    write_bigearthnet,
    write_eurosat,
    write_geobench,
    write_sen1floods11,
)
from tests.generators.copernicus import write_copernicus, write_landslide4sense

FIXTURES = {
    "EuroSATDataModule": lambda p: (write_eurosat(p, per_class=2, size=16), {}),
    "EuroSATSARDataModule": lambda p: (write_eurosat(p, per_class=2, size=16, sar=True), {}),
    "BigEarthNetDataModule": lambda p: (
        write_bigearthnet(p, split_files="torchgeo"),
        {"modalities": ["s1", "s2_l2a"], "img_size": 32},
    ),
    "GeoBenchDataModule": lambda p: (write_geobench(p / "m-brick-kiln", size=16), {}),
    "Sen1Floods11DataModule": lambda p: (write_sen1floods11(p, size=16), {}),
    "CopernicusBenchDataModule": lambda p: (
        write_copernicus(p, "dfc2020_s2"),
        {"task": "dfc2020_s2"},
    ),
    "Landslide4SenseDataModule": lambda p: (write_landslide4sense(p), {"missing_bands": "fill"}),
}
EXPORTED = [n for n in datasets.__all__ if n != "EvalDataModule"]


def test_every_exported_datamodule_has_a_fixture():
    assert sorted(FIXTURES) == sorted(EXPORTED)


@pytest.mark.parametrize("name", EXPORTED)
def test_datamodule_yields_eval_batches(tmp_path, name):
    root, kwargs = FIXTURES[name](tmp_path)
    dm = getattr(datasets, name)(root, batch_size=2, **kwargs)
    assert dm.task in ("classification", "segmentation") and dm.num_classes >= 2
    assert dm.ignore_index is None or isinstance(dm.ignore_index, int)
    assert not (dm.multilabel and dm.task == "segmentation")
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.predict_dataloader()):
        batch: EvalBatch = next(iter(loader))
        assert set(batch) <= set(EvalBatch.__annotations__) and "label" in batch
        images = [batch[m] for m in MODALITIES if m in batch]
        assert [m for m in MODALITIES if m in batch] == sorted(dm.modalities, key=MODALITIES.index)
        for m, x in zip([m for m in MODALITIES if m in batch], images, strict=True):
            assert x.dtype == torch.float32 and x.ndim == 4 and x.shape[1] == len(BANDS[m])
            assert x.shape[-1] % 16 == 0 and torch.isfinite(x).all()
        label, n = batch["label"], images[0].shape[0]
        if dm.task == "segmentation":
            assert label.dtype == torch.int64 and label.ndim == 3 and label.shape[0] == n
            valid = label[label != dm.ignore_index] if dm.ignore_index is not None else label
            assert valid.min() >= 0 and valid.max() < dm.num_classes
        elif dm.multilabel:
            assert label.dtype == torch.float32 and label.shape == (n, dm.num_classes)
        else:
            assert label.dtype == torch.int64 and label.shape == (n,)
            assert label.min() >= 0 and label.max() < dm.num_classes


@pytest.mark.parametrize("name", EXPORTED)
def test_make_eval_detects_each_datamodule_on_its_own_layout(tmp_path, name):
    from terrafm_lightning.eval.protocols import BENCHMARKS
    from terrafm_lightning.eval.report import detect

    root, kwargs = FIXTURES[name](tmp_path / "data")
    found = detect(root, "x")
    assert {BENCHMARKS[f.benchmark].datamodule.__name__ for f in found} == {name}
    # One folder may hold several Copernicus-Bench tasks (dfc2020_s1s2: S1 and S2).
    task = {k: v for k, v in kwargs.items() if k == "task"}
    assert task in [f.detection.kwargs for f in found]
    assert all(f.detection.problem is None for f in found)
    (tmp_path / "empty").mkdir()
    assert getattr(datasets, name).detect(tmp_path / "empty") == []
