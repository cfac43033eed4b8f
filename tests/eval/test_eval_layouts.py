"""Every benchmark read from its official and torchgeo layouts, band order checked by content."""

import numpy as np
import pytest
import torch

from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    CopernicusBenchDataModule,
    EuroSATDataModule,
    EuroSATSARDataModule,
    GeoBenchDataModule,
    Landslide4SenseDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.datasets.bigearthnet import BEN19_CLASSES
from terrafm_lightning.eval.datasets.eurosat import EUROSAT_CLASSES
from terrafm_lightning.modalities import BANDS
from tests.generators.benchmarks import (
    GEOBENCH_S2_NAMES,
    assert_band_codes,
    identity_stats,
    write_bigearthnet,
    write_bigearthnet_v2,
    write_eurosat,
    write_geobench,
    write_sen1floods11,
)
from tests.generators.copernicus import (
    COPERNICUS_CLASSES,
    EUROSAT_13,
    S2_13,
    write_copernicus,
    write_landslide4sense,
)


def sizes(dm):
    dm.setup()
    return {s: len(d) for s, d in dm.datasets.items()}


@pytest.mark.parametrize("layout", ["torchgeo", "zenodo", "flat"])
def test_eurosat_layouts_splits_and_b8a_last(tmp_path, layout):
    root = write_eurosat(tmp_path, per_class=3, size=16, layout=layout)
    dm = EuroSATDataModule(root, stats=identity_stats("s2_l1c"))
    assert sizes(dm) == {"train": 20, "val": 10, "test": 10}
    kind = type(dm.datasets["train"]).__name__
    assert kind == ("AdaptedDataset" if layout == "torchgeo" else "SampleDataset")
    for index in (0, 7):
        sample = dm.datasets["val"][index]
        label = int(sample["label"])
        assert dm.datasets["val"].__len__() == 10 and 0 <= label < 10
        # The stem's B8A channel receives the file's LAST band, B09 the 9th, B11 the 11th.
        assert_band_codes(sample["s2_l1c"], BANDS["s2_l1c"], label)
    labels = sorted(int(dm.datasets["test"][i]["label"]) for i in range(10))
    assert labels == list(range(10)) and len(EUROSAT_CLASSES) == dm.num_classes


def test_eurosat_sar_copernicus_layout(tmp_path):
    root = write_eurosat(tmp_path, per_class=2, size=16, sar=True, layout="sar")
    dm = EuroSATSARDataModule(root, stats=identity_stats("s1"))
    assert sizes(dm) == {"train": 10, "val": 10, "test": 10}
    sample = dm.datasets["train"][3]
    assert_band_codes(sample["s1"], ("VV", "VH"), int(sample["label"]))


def test_missing_split_files_error_unless_seeded_opt_in(tmp_path):
    root = write_eurosat(tmp_path, per_class=3, size=16, split_files=False, layout="zenodo")
    with pytest.raises(FileNotFoundError, match=r"eurosat-train.txt.*split_seed"):
        EuroSATDataModule(root).setup()
    with pytest.warns(UserWarning, match="split_seed=3"):
        assert sum(sizes(EuroSATDataModule(root, split_seed=3)).values()) == 30
    with pytest.raises(FileNotFoundError, match=r"expected the ten EuroSAT class folders.*found"):
        EuroSATDataModule(tmp_path / "EuroSAT_MS" / "Forest")


def test_wrong_band_count_names_file_and_numbers(tmp_path):
    from tests.generators.benchmarks import write_tif

    root = write_eurosat(tmp_path, per_class=2, size=16, layout="flat")
    bad = root / "Forest" / "Forest_1.tif"
    write_tif(bad, np.zeros((12, 16, 16), dtype=np.uint16))
    dm = EuroSATDataModule(root)
    dm.setup()
    index = next(i for i, k in enumerate(dm.datasets["train"].keys) if k == bad)
    with pytest.raises(ValueError, match=r"Forest_1.tif: 12 bands, expected 13"):
        dm.datasets["train"][index]
    write_tif(bad, np.zeros((13, 16, 16), dtype=np.float32))
    with pytest.raises(
        ValueError, match=r"Forest_1.tif: dtype float32, expected one of \['uint16'\]"
    ):
        dm.datasets["train"][index]


@pytest.mark.parametrize("split_files", ["torchgeo", "official"])
def test_bigearthnet_v1_split_files_and_s2_only_ignores_s1(tmp_path, split_files):
    root = write_bigearthnet(tmp_path, n=6, split_files=split_files)
    # A broken S1 metadata file must not matter to an S2-only evaluation.
    next((root / "BigEarthNet-S1-v1.0").glob("*/*_labels_metadata.json")).write_text("{broken")
    dm = BigEarthNetDataModule(root)
    assert sizes(dm) == {"train": 4, "val": 1, "test": 1}
    assert dm.num_classes == 19 and dm.multilabel
    with pytest.raises(ValueError, match="unreadable labels metadata"):
        BigEarthNetDataModule(root, modalities=["s1"])


def test_bigearthnet_v2_through_torchgeo(tmp_path):
    root = write_bigearthnet_v2(tmp_path, n=6)
    dm = BigEarthNetDataModule(
        root, modalities=["s1", "s2_l2a"], stats=identity_stats("s1", "s2_l2a")
    )
    assert dm.version == 2 and sizes(dm) == {"train": 4, "val": 1, "test": 1}
    sample = dm.datasets["train"][1]
    assert_band_codes(sample["s2_l2a"], BANDS["s2_l2a"], 1)
    assert_band_codes(sample["s1"], ("VV", "VH"), 1)  # torchgeo stacks them as (VH, VV)
    assert sample["label"].nonzero().flatten().tolist() == [
        BEN19_CLASSES.index("Coniferous forest")
    ]


def test_geobench_georeferenced_pickles_and_m_eurosat_order(tmp_path):
    cashew = write_geobench(
        tmp_path / "segmentation_v1.0" / "m-cashew-plant", task="segmentation", georeferenced=True
    )
    dm = GeoBenchDataModule(tmp_path, task="m-cashew-plant")
    assert dm.root == cashew and dm.task == "segmentation" and sizes(dm)["train"] == 4
    root = write_geobench(tmp_path / "m-eurosat", n=4, num_classes=2, content_bands=EUROSAT_13)
    dm = GeoBenchDataModule(root, stats=identity_stats("s2_l1c"))
    sample = dm.split_datasets()["train"][1]
    assert_band_codes(sample["s2_l1c"], BANDS["s2_l1c"], 1)
    # Other tasks: bands by the number in their names (standard order, B8A after B08).
    assert GEOBENCH_S2_NAMES[8].startswith("08A")
    named = write_geobench(tmp_path / "m-brick-kiln", n=4, content_bands=S2_13)
    sample = GeoBenchDataModule(named, stats=identity_stats("s2_l1c")).split_datasets()["train"][1]
    assert_band_codes(sample["s2_l1c"], BANDS["s2_l1c"], 1)


@pytest.mark.parametrize("bucket", [True, False])
def test_sen1floods11_bucket_and_flat_layouts(tmp_path, bucket):
    root = write_sen1floods11(tmp_path, n=5, size=16, bucket=bucket)
    dm = Sen1Floods11DataModule(
        root, modalities=["s1", "s2_l1c"], stats=identity_stats("s1", "s2_l1c")
    )
    assert sizes(dm) == {"train": 3, "val": 1, "test": 1}
    sample = dm.datasets["test"][0]
    assert_band_codes(sample["s2_l1c"], BANDS["s2_l1c"], 0.5)  # half the chip is not water


COPERNICUS = {
    "cloud_s2": ("s2_l1c", "segmentation", 4),
    "eurosat_s1": ("s1", "classification", 10),
    "eurosat_s2": ("s2_l1c", "classification", 10),
    "bigearthnet_s1": ("s1", "classification", 19),
    "bigearthnet_s2": ("s2_l2a", "classification", 19),
    "dfc2020_s1": ("s1", "segmentation", 11),
    "dfc2020_s2": ("s2_l1c", "segmentation", 11),
    "lcz_s2": ("s2_l1c", "classification", 17),
    "flood_s1": ("s1", "segmentation", 3),
}


@pytest.mark.parametrize("official", [False, True], ids=["torchgeo", "official"])
@pytest.mark.parametrize("task", sorted(COPERNICUS))
def test_copernicus_bench_tasks(tmp_path, task, official):
    modality, kind, num_classes = COPERNICUS[task]
    root = write_copernicus(tmp_path, task, official=official)
    dm = CopernicusBenchDataModule(
        root, task=task, stats=identity_stats(modality), missing_bands="fill"
    )
    assert (dm.modalities, dm.task, dm.num_classes) == ([modality], kind, num_classes)
    assert sizes(dm) == {"train": 4, "val": 2, "test": 2}
    sample = dm.datasets["train"][1]
    present = [
        b for b in BANDS[modality] if b not in dm.band_mapping(modality, dm.bands, "").missing
    ]
    image = sample[modality][[BANDS[modality].index(b) for b in present]]
    if kind == "segmentation":
        assert sample["label"].shape == (16, 16) and set(sample["label"].unique().tolist()) == {
            1,
            2,
        }
        label = 1 if task == "flood_s1" else 0  # Flood-S1: the post-event image
    else:
        label = 1
        target = sample["label"]
        if dm.multilabel:
            assert target.tolist() == [float(k == 9) for k in range(19)]
        elif task.startswith("eurosat"):
            assert COPERNICUS_CLASSES[int(target)] == COPERNICUS_CLASSES[1]
    assert_band_codes(image, present, label)


def test_copernicus_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown Copernicus-Bench task 'nope'"):
        CopernicusBenchDataModule(tmp_path, task="nope")
    with pytest.raises(FileNotFoundError, match=r"eurosat_s1/eurosat-train.txt.*found nothing"):
        CopernicusBenchDataModule(tmp_path, task="eurosat_s1")


@pytest.mark.parametrize("layout", ["official", "huggingface"])
def test_landslide4sense_layouts(tmp_path, layout):
    root = write_landslide4sense(tmp_path, layout=layout)
    strict = Landslide4SenseDataModule(root)
    strict.setup()
    with pytest.raises(ValueError, match=r"\['B8A'\] are absent"):
        strict.datasets["train"][0]
    dm = Landslide4SenseDataModule(root, missing_bands="fill")
    assert sizes(dm) == {"train": 4, "val": 2, "test": 2} and dm.task == "segmentation"
    sample = dm.datasets["test"][0]
    bands = [b for b in BANDS["s2_l1c"] if b != "B8A"]
    image = sample["s2_l1c"][[BANDS["s2_l1c"].index(b) for b in bands]]
    assert_band_codes(image, bands, 0)
    assert sample["label"][:8].eq(1).all() and sample["label"][8:].eq(0).all()
    assert torch.is_tensor(sample["label"])
