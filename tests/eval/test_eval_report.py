import json

import pytest

from terrafm_lightning.eval.report import find_datasets, main
from terrafm_lightning.models import export_released_weights, terrafm_tiny
from tests.generators.benchmarks import (
    pretraining_checkpoint,
    write_eurosat,
    write_geobench,
    write_sen1floods11,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_eurosat(root / "eurosat" / "EuroSAT_MS", per_class=2, size=16)
    write_sen1floods11(root / "floods", n=5, size=16)
    write_geobench(root / "geobench" / "m-mystery", n=4, size=16)  # unknown task: skipped
    (root / "notes").mkdir()
    return root


def test_find_datasets_by_layout(data):
    found = {name: kind.__name__ for name, _, kind in find_datasets(data)}
    assert found == {
        "eurosat/EuroSAT_MS": "EuroSATDataModule",
        "floods": "Sen1Floods11DataModule",
        "geobench/m-mystery": "GeoBenchDataModule",
    }


def test_make_eval_writes_tables_next_to_random_init(data, tmp_path, capsys):
    pretraining_checkpoint(tmp_path / "pre.ckpt")
    out = tmp_path / "results"
    main(
        [
            "--ckpt",
            str(tmp_path / "pre.ckpt"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--epochs",
            "1",
        ]
    )
    report = json.loads((out / "results.json").read_text())
    assert report["backbone"] == "terrafm_tiny" and report["backbone_kwargs"]["depth"] == 2
    rows = {(r["dataset"], r.get("protocol")): r for r in report["rows"]}
    assert set(rows) == {
        ("eurosat/EuroSAT_MS", "knn"),
        ("eurosat/EuroSAT_MS", "linear"),
        ("floods", "linear"),
        ("geobench/m-mystery", None),
    }
    assert "num_classes" in rows["geobench/m-mystery", None]["skipped"]
    for key in [
        ("eurosat/EuroSAT_MS", "knn"),
        ("eurosat/EuroSAT_MS", "linear"),
        ("floods", "linear"),
    ]:
        results = rows[key]["results"]
        assert set(results) == {"checkpoint", "random init"}
        metric = rows[key]["metric"]
        assert all(0 <= results[s][metric] <= 1 for s in results)
    assert rows["floods", "linear"]["metric"] == "miou"
    table = (out / "results.md").read_text()
    assert "| dataset | protocol | metric | checkpoint | random init |" in table
    assert "| eurosat/EuroSAT_MS | knn | top1 |" in table and "m-mystery` skipped" in table
    assert table in capsys.readouterr().out


def test_released_weights_source_and_argument_errors(data, tmp_path):
    path = tmp_path / "TerraFM-Ti.pth"
    import torch

    torch.save(export_released_weights(terrafm_tiny(depth=2)), path)
    out = tmp_path / "released"
    eurosat = data / "eurosat"
    main(
        [
            "--released",
            str(path),
            "--backbone",
            "terrafm_tiny",
            "--data",
            str(eurosat),
            "--out",
            str(out),
            "--epochs",
            "1",
        ]
    )
    report = json.loads((out / "results.json").read_text())
    assert list(report["sources"]) == ["released", "random init"]
    with pytest.raises(SystemExit):
        main(["--data", str(eurosat)])  # no backbone source
    with pytest.raises(FileNotFoundError, match="no EuroSAT, BigEarthNet"):
        main(["--released", str(path), "--data", str(data / "notes"), "--out", str(out)])
