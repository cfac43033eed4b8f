import json

import pytest
import torch

from terrafm_lightning.eval.features import SplitFeatures
from terrafm_lightning.eval.report import find_datasets, main, paper_results, seeded_subset
from terrafm_lightning.models import export_released_weights, terrafm_tiny
from tests.conftest import shared_path
from tests.generators.benchmarks import (
    pretraining_checkpoint,
    write_eurosat,
    write_geobench,
    write_sen1floods11,
)
from tests.generators.copernicus import write_copernicus, write_landslide4sense


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_eurosat(root / "eurosat", per_class=2, size=16, layout="zenodo")
    write_sen1floods11(root / "floods", n=5, size=16, bucket=True)
    write_geobench(root / "geobench" / "m-mystery", n=4, size=16)  # unknown task: skipped
    write_geobench(root / "geobench" / "m-brick-kiln", n=8, size=16)
    write_copernicus(root / "copernicus", "eurosat_s1", official=True)
    write_landslide4sense(root / "l4s")
    (root / "notes").mkdir()
    return root


def test_find_datasets_by_layout(data):
    found = {f.name: (f.factory.__name__, f.paper_key) for f in find_datasets(data)}
    assert found == {
        "copernicus/eurosat_s1": ("CopernicusBenchDataModule", "copernicus/eurosat_s1"),
        "eurosat": ("EuroSATDataModule", None),
        "floods": ("Sen1Floods11DataModule", None),
        "geobench/m-brick-kiln": ("GeoBenchDataModule", "geobench/brick-kiln"),
        "geobench/m-mystery": ("GeoBenchDataModule", "geobench/mystery"),
        "l4s": ("Landslide4SenseDataModule", "landslide4sense"),
    }


def test_paper_column_cites_its_source_and_matches_the_reference():
    paper = paper_results()
    assert "mbzuai-oryx/TerraFM" in paper["source"] and paper["model"] == "TerraFM-B"
    assert paper["rows"]["geobench/eurosat"] == {
        "kNN 100%": 94.2,
        "kNN 1%": 59.3,
        "fine-tune": 98.1,
    }
    assert paper["rows"]["copernicus/bigearthnet_s1"]["frozen probe"] == 76.9
    reference = shared_path("reference", "paper_results.md").read_text()
    for row in paper["rows"].values():
        for value in row.values():
            assert f"{value:.1f}" in reference


def test_seeded_one_percent_subsets_are_deterministic():
    split = SplitFeatures(torch.arange(300.0)[:, None], torch.arange(300))
    a, b, c = (seeded_subset(split, 0.01, s) for s in (0, 0, 1))
    assert a.labels.tolist() == b.labels.tolist() and len(a.labels) == 3
    assert a.labels.tolist() != c.labels.tolist()
    assert (
        len(seeded_subset(SplitFeatures(torch.zeros(5, 1), torch.arange(5)), 0.01, 0).labels) == 1
    )


def test_make_eval_writes_tables_with_paper_column_and_seeds(data, tmp_path, capsys):
    pretraining_checkpoint(tmp_path / "pre.ckpt")
    out = tmp_path / "results"
    argv = ["--ckpt", str(tmp_path / "pre.ckpt"), "--data", str(data), "--out", str(out)]
    main([*argv, "--epochs", "1", "--batch-size", "8", "--probe-steps", "20"])
    report = json.loads((out / "results.json").read_text())
    assert report["backbone"] == "terrafm_tiny" and report["backbone_kwargs"]["depth"] == 2
    rows = {(r["dataset"], r.get("protocol")): r for r in report["rows"]}
    assert set(rows) == {
        *(("eurosat", p) for p in ("kNN 100%", "kNN 1%", "frozen probe")),
        *(("copernicus/eurosat_s1", p) for p in ("kNN 100%", "kNN 1%", "frozen probe")),
        *(("geobench/m-brick-kiln", p) for p in ("kNN 100%", "kNN 1%", "frozen probe")),
        ("floods", "linear seg"),
        ("l4s", "linear seg"),
        ("l4s", "linear seg (landslide IoU)"),
        ("geobench/m-mystery", None),
    }
    assert "num_classes" in rows["geobench/m-mystery", None]["skipped"]
    assert rows["geobench/m-brick-kiln", "kNN 1%"]["paper"] == 85.6
    assert rows["l4s", "linear seg (landslide IoU)"]["metric"] == "iou_1"
    assert (
        rows["l4s", "linear seg"]["paper"] == 70.8 and rows["floods", "linear seg"]["paper"] is None
    )
    for row in rows.values():
        if "skipped" in row:
            continue
        assert set(row["results"]) == {"checkpoint", "random init"}
        for result in row["results"].values():
            assert 0 <= result["mean"] <= 100
            assert len(result["values"]) == 1
    # Features were cached once per source, dataset and split.
    cached = sorted(p.relative_to(out).as_posix() for p in (out / "features").rglob("*.pt"))
    assert "features/checkpoint/eurosat/train.pt" in cached and len(cached) == 2 * 3 * 2
    table = (out / "results.md").read_text()
    assert "| dataset | protocol | metric | checkpoint | random init | paper TerraFM-B |" in table
    assert "| geobench/m-brick-kiln | kNN 1% | top1 |" in table
    assert "| 85.6 |" in table and "m-mystery` skipped" in table
    assert (out / "results.png").stat().st_size > 1000
    assert table in capsys.readouterr().out


def test_seeds_give_mean_and_std_and_geobench_is_fine_tuned(data, tmp_path):
    pretraining_checkpoint(tmp_path / "pre.ckpt")
    out = tmp_path / "seeds"
    main(["--ckpt", str(tmp_path / "pre.ckpt"), "--data", str(data / "geobench" / "m-brick-kiln")]
         + ["--out", str(out), "--seeds", "2", "--finetune-epochs", "1", "--batch-size", "8"]
         + ["--probe-steps", "20"])  # fmt: skip
    rows = {r["protocol"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"kNN 100%", "kNN 1%", "frozen probe", "fine-tune"}
    assert rows["fine-tune"]["paper"] == 98.7
    for protocol, row in rows.items():
        for result in row["results"].values():
            assert len(result["values"]) == (1 if protocol == "kNN 100%" else 2)
    assert " ± " in (out / "results.md").read_text()


def test_released_weights_source_and_argument_errors(data, tmp_path):
    path = tmp_path / "TerraFM-Ti.pth"
    torch.save(export_released_weights(terrafm_tiny(depth=2)), path)
    out = tmp_path / "released"
    eurosat = data / "eurosat"
    main(["--released", str(path), "--backbone", "terrafm_tiny", "--data", str(eurosat)]
         + ["--backbone-kwargs", '{"depth": 2}']
         + ["--out", str(out), "--epochs", "1", "--probe-steps", "20"])  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    assert list(report["sources"]) == ["released", "random init"]
    with pytest.raises(SystemExit):
        main(["--data", str(eurosat)])  # no backbone source
    with pytest.raises(FileNotFoundError, match="no EuroSAT, BigEarthNet"):
        main(["--released", str(path), "--data", str(data / "notes"), "--out", str(out)])
