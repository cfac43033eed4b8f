import json
import shutil

import numpy as np
import pytest
import torch

from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    EuroSATSARDataModule,
    GeoBenchDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.datasets.base import input_size
from terrafm_lightning.eval.datasets.bigearthnet import BEN19_CLASSES, ben19_target
from terrafm_lightning.eval.datasets.geobench import read_sample, s2_band_names
from terrafm_lightning.modalities import S2_L1C_ALL_BANDS
from tests.conftest import shared_path
from tests.generators.benchmarks import (
    GEOBENCH_S2_NAMES,
    replace_geobench_pickle,
    write_bigearthnet,
    write_eurosat,
    write_geobench,
    write_sen1floods11,
)


def first_batch(dm, split="train"):
    dm.setup()
    return next(iter(getattr(dm, f"{split}_dataloader")()))


@pytest.mark.parametrize("native,size", [(64, 64), (120, 128), (512, 512), (8, 16)])
def test_input_size_rounds_to_multiples_of_16(native, size):
    assert input_size(native, None) == size
    with pytest.raises(ValueError, match="multiple of 16"):
        input_size(native, 100)


def test_eurosat_official_splits_labels_and_bands(tmp_path):
    root = write_eurosat(tmp_path, per_class=3, size=32)
    dm = EuroSATDataModule(root, batch_size=30)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 20, "val": 10, "test": 10}
    batch = next(iter(dm.val_dataloader()))
    assert batch["s2_l1c"].shape == (10, 12, 32, 32) and batch["s2_l1c"].dtype == torch.float32
    assert sorted(batch["label"].tolist()) == list(range(10))
    # Class brightness grows with the label: the normalised mean must follow it.
    means = batch["s2_l1c"].mean(dim=(1, 2, 3))
    assert torch.equal(means.argsort(), batch["label"].argsort())
    assert EuroSATDataModule(root, img_size=64).prepare(
        np.zeros((13, 32, 32)), "s2_l1c", S2_L1C_ALL_BANDS, "x"
    ).shape == (12, 64, 64)


def test_eurosat_errors_and_fallback_split(tmp_path):
    root = write_eurosat(tmp_path / "ms", per_class=3, size=16, split_files=False)
    with pytest.warns(UserWarning, match="no official split"):
        EuroSATDataModule(root, split_seed=0).setup()
    shutil.rmtree(root / "River")
    with pytest.raises(FileNotFoundError, match=r"expected the ten EuroSAT class folders"):
        EuroSATDataModule(root)
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        EuroSATDataModule(tmp_path / "nowhere")
    sar = write_eurosat(tmp_path / "sar", per_class=2, size=16, sar=True)
    with pytest.raises(ValueError, match="modality 's2_l1c' not in this dataset"):
        EuroSATSARDataModule(sar, modalities=["s2_l1c"])
    (sar / "eurosat-test.txt").write_text("Forest_99.tif\n")
    with pytest.raises(FileNotFoundError, match="Forest_99"):
        EuroSATSARDataModule(sar).setup()
    (sar / "eurosat-test.txt").write_text("Forest_1.tif\n")
    batch = first_batch(EuroSATSARDataModule(sar, batch_size=4), "test")
    assert batch["s1"].shape == (1, 2, 16, 16) and batch["label"].tolist() == [1]
    # A 13-band file in the SAR dataset is reported with its path.
    (sar / "Forest" / "Forest_1.tif").write_bytes((root / "Forest" / "Forest_1.tif").read_bytes())
    with pytest.raises(ValueError, match=r"Forest_1.tif: 13 bands, expected 2"):
        first_batch(EuroSATSARDataModule(sar, batch_size=4), "test")


def test_bigearthnet_19_classes_and_resampling(tmp_path):
    root = write_bigearthnet(tmp_path, n=6)
    for split, names in {"train": [0, 1, 2], "val": [3], "test": [4, 5]}.items():
        (root / f"{split}.csv").write_text(
            "".join(f"S2A_MSIL2A_20170613T101031_{i}_{i}\n" for i in names)
        )
    dm = BigEarthNetDataModule(root, modalities=["s1", "s2_l2a"], batch_size=3)
    assert dm.num_classes == 19 and dm.multilabel
    batch = first_batch(dm, "test")
    assert batch["s2_l2a"].shape == (2, 12, 128, 128) and batch["s1"].shape == (2, 2, 128, 128)
    expected = ben19_target(["Sea and ocean", "Estuaries"], "x")
    assert torch.equal(batch["label"][0], expected) and expected.sum() == 1  # both marine waters
    airports = ben19_target(["Non-irrigated arable land", "Airports"], "x")
    assert airports.nonzero().flatten().tolist() == [BEN19_CLASSES.index("Arable land")]
    with pytest.raises(ValueError, match=r"x: unknown BigEarthNet labels \['Glaciers'\]"):
        ben19_target(["Glaciers"], "x")
    band = next((root / "BigEarthNet-v1.0").iterdir())
    (band / f"{band.name}_B05.tif").unlink()
    dm = BigEarthNetDataModule(root, batch_size=6)
    dm.setup()
    with pytest.raises(FileNotFoundError, match="missing band file .*_B05.tif"):
        next(iter(dm.train_dataloader()))


def test_bigearthnet_real_samples_pair_s1_and_s2():
    root = shared_path("data", "bigearthnet_examples")
    dm = BigEarthNetDataModule(root, modalities=["s2_l2a", "s1"], batch_size=6, img_size=112)
    assert len(dm.s1) == 6 and set(dm.s1) == set(dm.s2)  # paired by corresponding_s2_patch
    sample = dm.load("S2A_MSIL2A_20170613T101031_87_48")
    assert sample["s2_l2a"].shape == (12, 112, 112) and sample["s1"].shape == (2, 112, 112)
    assert torch.isfinite(sample["s2_l2a"]).all() and sample["s2_l2a"].abs().mean() < 5
    classes = {BEN19_CLASSES[i] for i in sample["label"].nonzero().flatten()}
    assert classes == {"Arable land", BEN19_CLASSES[6]}


def test_geobench_classification_segmentation_multilabel(tmp_path):
    dm = GeoBenchDataModule(write_geobench(tmp_path / "m-brick-kiln"), batch_size=8)
    assert (dm.task, dm.num_classes, dm.multilabel, dm.modalities) == (
        "classification",
        2,
        False,
        ["s2_l1c"],
    )
    batch = first_batch(dm)
    assert batch["s2_l1c"].shape == (4, 12, 32, 32) and set(batch["label"].tolist()) == {0, 1}
    seg = GeoBenchDataModule(
        write_geobench(tmp_path / "m-cashew-plant", task="segmentation", extra_s1=True),
        batch_size=8,
    )
    assert seg.task == "segmentation" and seg.num_classes == 7
    batch = first_batch(seg)
    assert batch["label"].shape == (4, 32, 32) and batch["s2_l1c"].shape[1] == 12  # S1 band ignored
    twelve = GEOBENCH_S2_NAMES[:10] + GEOBENCH_S2_NAMES[11:]
    ml = GeoBenchDataModule(
        write_geobench(
            tmp_path / "m-bigearthnet", task="multilabel", band_names=twelve, num_classes=43
        )
    )
    assert ml.multilabel and ml.modalities == ["s2_l2a"]
    assert first_batch(ml)["label"].shape == (4, 43)


def test_geobench_band_names_content_order_and_names():
    # m-eurosat holds the EuroSAT file order (B8A last) under the standard names.
    eurosat = s2_band_names(GEOBENCH_S2_NAMES, "m-eurosat", "eurosat")
    assert eurosat[8:] == ["B09", "B10", "B11", "B12", "B8A"]
    assert s2_band_names(GEOBENCH_S2_NAMES, "m-brick-kiln", "brick-kiln") == list(S2_L1C_ALL_BANDS)
    ten = [n for n in GEOBENCH_S2_NAMES if not n.startswith(("01", "09", "10"))]
    assert s2_band_names(ten, "x") == [
        "B02",
        "B03",
        "B04",
        "B05",
        "B06",
        "B07",
        "B08",
        "B8A",
        "B11",
        "B12",
    ]
    with pytest.raises(ValueError, match="cannot read the S2 band of 'Red'"):
        s2_band_names(["Red"], "x")


def test_geobench_errors(tmp_path):
    root = write_geobench(tmp_path / "m-unknown-task", n=4)
    with pytest.raises(ValueError, match="unknown GEO-Bench task 'unknown-task'; pass num_classes"):
        GeoBenchDataModule(root)
    (root / "default_partition.json").write_text("{not json")
    with pytest.raises(ValueError, match="default_partition.json: malformed partition"):
        GeoBenchDataModule(root, num_classes=2)
    with pytest.raises(FileNotFoundError, match="0.01x_train_partition.json not found"):
        GeoBenchDataModule(root, num_classes=2, partition="0.01x_train")
    (tmp_path / "bad.hdf5").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.hdf5: not a GEO-Bench v1 sample"):
        read_sample(tmp_path / "bad.hdf5")
    root = write_geobench(tmp_path / "m-eurosat", n=4)
    (root / "sample_3.hdf5").unlink()
    with pytest.raises(FileNotFoundError, match="partition samples missing"):
        GeoBenchDataModule(root).setup()


def test_geobench_refuses_arbitrary_pickled_globals(tmp_path):
    import os

    root = write_geobench(tmp_path / "m-eurosat", n=4)
    for metadata, global_name in ({"label": shutil.rmtree}, "shutil.rmtree"), (os.system, "system"):
        path = replace_geobench_pickle(root / "sample_0.hdf5", metadata)
        with pytest.raises(
            ValueError, match=rf"sample_0.hdf5: .*refusing to unpickle \S*{global_name}"
        ):
            read_sample(path)


def test_geobench_pickled_list_is_a_one_line_error_naming_the_file(tmp_path):
    root = write_geobench(tmp_path / "m-eurosat", n=4)
    replace_geobench_pickle(root / "sample_0.hdf5", ["not", "a", "dict"])
    message = (
        f"{root / 'sample_0.hdf5'}: not a GEO-Bench v1 sample (ValueError: pickled metadata is "
        "a list, not a dict)"
    )
    with pytest.raises(ValueError) as err:
        GeoBenchDataModule(root)  # reads the first training sample
    assert str(err.value) == message


def test_geobench_real_brick_kiln_samples():
    root = shared_path("data", "geobench_v1", "brick_kiln_v1.0")
    arrays, label, names = read_sample(root / "examples_0_12.hdf5")
    assert len(names) == 13 and int(label) in (0, 1)
    dm = GeoBenchDataModule(root, batch_size=5)  # "brick_kiln_v1.0" -> the brick-kiln task
    assert dm.num_classes == 2 and dm.task == "classification"
    batch = first_batch(dm)
    assert batch["s2_l1c"].shape == (5, 12, 64, 64) and torch.isfinite(batch["s2_l1c"]).all()
    blue = torch.tensor(arrays["02 - Blue"]).mean()
    assert abs(float(blue) - 685.5) < 400  # raw DN scale of the real samples (band_stats mean)
    stats = json.loads((root / "band_stats.json").read_text())
    assert "08A - Vegetation Red Edge" in stats


def test_sen1floods11_ignore_nan_and_splits(tmp_path):
    root = write_sen1floods11(tmp_path, n=5, size=32)
    dm = Sen1Floods11DataModule(root, modalities=["s1", "s2_l1c"], batch_size=5)
    assert (dm.task, dm.num_classes, dm.ignore_index) == ("segmentation", 2, -1)
    dm.setup()
    assert {s: len(d) for s, d in dm.datasets.items()} == {"train": 3, "val": 1, "test": 1}
    batch = next(iter(dm.train_dataloader()))
    assert torch.isfinite(batch["s1"]).all() and (batch["s1"][:, :, 0, 0] == 0).all()  # NaN -> mean
    assert set(batch["label"].unique().tolist()) == {-1, 0, 1}
    assert (batch["label"][:, -2:] == -1).all()
    shutil.rmtree(root / "S2Hand")
    with pytest.raises(FileNotFoundError, match=r"expected Sen1Floods11 folders .*'S2Hand'"):
        Sen1Floods11DataModule(root, modalities=["s1", "s2_l1c"])
