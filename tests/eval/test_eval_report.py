import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from terrafm_lightning.eval.features import FeatureCache, SplitFeatures, cache_key
from terrafm_lightning.eval.knn import knn_evaluate
from terrafm_lightning.eval.linear_probe import linear_probe_on_features
from terrafm_lightning.eval.protocols import seeded_subset
from terrafm_lightning.eval.render import markdown_table
from terrafm_lightning.eval.report import ReportError, find_datasets, main, paper_results
from terrafm_lightning.models import export_released_weights, terrafm_tiny
from tests.conftest import shared_path
from tests.generators.benchmarks import (
    pretraining_checkpoint,
    truncated_copy,
    write_bigearthnet,
    write_eurosat,
    write_geobench,
    write_sen1floods11,
)
from tests.generators.copernicus import write_copernicus, write_landslide4sense

FAST = ["--epochs", "1", "--batch-size", "8", "--probe-steps", "20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_eurosat(root / "eurosat", per_class=2, size=16, layout="zenodo")
    write_sen1floods11(root / "floods", n=5, size=16, bucket=True)
    write_geobench(root / "geobench" / "m-mystery", n=4, size=16)  # unknown task: skipped
    write_geobench(root / "geobench" / "m-brick-kiln", n=8, size=16)
    write_geobench(root / "geobench" / "m-so2sat", n=4, size=16, partition=False)
    write_bigearthnet(root / "ben", n=4)  # no split files
    write_copernicus(root / "copernicus", "eurosat_s1", official=True)
    write_landslide4sense(root / "l4s")
    (root / "notes").mkdir()
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "pre.ckpt"
    pretraining_checkpoint(path, seed=1)  # seed 0 would equal the random init
    return path


def test_find_datasets_by_layout(data):
    found, unrecognised = find_datasets(data)
    got = {f.name: (f.benchmark, f.detection.paper_key, f.detection.problem) for f in found}
    assert got == {
        "ben": ("bigearthnet", None, None),
        "copernicus/eurosat_s1": ("copernicus", "copernicus/eurosat_s1", None),
        "eurosat": ("eurosat", None, None),
        "floods": ("sen1floods11", None, None),
        "geobench/m-brick-kiln": ("geobench", "geobench/brick-kiln", None),
        "geobench/m-mystery": ("geobench", "geobench/mystery", None),
        "geobench/m-so2sat": (
            "geobench",
            "geobench/so2sat",
            "GEO-Bench task folder (.hdf5 samples) without default_partition.json",
        ),
        "l4s": ("landslide4sense", "landslide4sense", None),
    }
    assert unrecognised == [data / "notes"]


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


def _cached(out, report, dataset, source, split):
    """The features the report cached for one source, dataset and split (looked up by key)."""
    from terrafm_lightning.eval.datasets import EuroSATDataModule

    dm = EuroSATDataModule(dataset, batch_size=8, missing_bands="fill")
    dm.setup()
    key = cache_key(
        report["sources"][source]["weights_sha256"],
        {"backbone": report["backbone"], "backbone_kwargs": report["backbone_kwargs"]},
        dataset, split, dm.datasets[split],
        {"datamodule": "EuroSATDataModule", "detection": {}, "modalities": ["s2_l1c"],
         "img_size": None, "missing_bands": "fill", "stats": {}, "split_seed": None},
    )  # fmt: skip
    return FeatureCache(out / "features").load(key)


def test_make_eval_tables_rows_warnings_and_not_evaluated(data, checkpoint, tmp_path, capsys):
    out = tmp_path / "results"
    main(["--ckpt", str(checkpoint), "--data", str(data), "--out", str(out), *FAST])
    report = json.loads((out / "results.json").read_text())
    assert report["backbone"] == "terrafm_tiny" and report["backbone_kwargs"]["depth"] == 2
    rows = {(r["dataset"], r["protocol"]): r for r in report["rows"]}
    assert set(rows) == {
        *(("eurosat", p) for p in ("kNN 100%", "kNN 1%", "frozen probe")),
        *(("copernicus/eurosat_s1", p) for p in ("kNN 100%", "kNN 1%", "frozen probe")),
        *(("geobench/m-brick-kiln", p) for p in ("kNN 100%", "kNN 1%", "frozen probe")),
        ("floods", "linear seg"),
        ("l4s", "linear seg"),
        ("l4s", "linear seg (landslide IoU)"),
    }
    not_evaluated = {s["dataset"]: s["reason"] for s in report["not_evaluated"]}
    assert set(not_evaluated) == {"geobench/m-mystery", "geobench/m-so2sat", "ben", "notes"}
    assert (
        "unknown GEO-Bench task 'mystery'; pass num_classes" in not_evaluated["geobench/m-mystery"]
    )
    assert not_evaluated["geobench/m-so2sat"] == (
        "GEO-Bench task folder (.hdf5 samples) without default_partition.json"
    )
    assert (
        "--split-seed <int>" in not_evaluated["ben"] and "SPLIT_SEED=<int>" in not_evaluated["ben"]
    )
    assert not_evaluated["notes"] == "no benchmark layout recognised in this folder"
    # Rows: metric, paper value, samples per split and the split warnings.
    assert rows["geobench/m-brick-kiln", "kNN 1%"]["paper"] == 85.6
    assert rows["geobench/m-brick-kiln", "kNN 1%"]["samples"] == {"train": 4, "val": 2, "test": 2}
    assert rows["geobench/m-brick-kiln", "kNN 1%"]["warnings"] == ["test split of 2 samples (< 50)"]
    assert rows["eurosat", "kNN 100%"]["warnings"] == [
        "10 samples in both val and test",  # the generator's val and test lists are the same
        "test split of 10 samples (< 50)",
    ]
    assert rows["l4s", "linear seg (landslide IoU)"]["metric"] == "iou_1"
    assert rows["copernicus/eurosat_s1", "kNN 100%"]["metric"] == "top1"
    assert (
        rows["l4s", "linear seg"]["paper"] == 70.8 and rows["floods", "linear seg"]["paper"] is None
    )
    # The numbers are the protocols' own on the cached features (exact, in %).
    train, test = (
        _cached(out, report, data / "eurosat", "checkpoint", s) for s in ("train", "test")
    )
    assert train.features.shape == (10, 192)
    knn = knn_evaluate(*train, *test, 10)["top1"]
    probe = linear_probe_on_features(train, test, 10, steps=20, seed=0)["top1"]
    assert rows["eurosat", "kNN 100%"]["results"]["checkpoint"]["values"] == [100 * knn]
    assert rows["eurosat", "frozen probe"]["results"]["checkpoint"]["values"] == [100 * probe]
    for row in rows.values():
        assert set(row["results"]) == {"checkpoint", "random init"}
        assert all(len(r["values"]) == 1 for r in row["results"].values())
    # Every classification split of each source was extracted once: 3 datasets x 2 x 2.
    assert report["feature_cache"] == {"reused": 0, "computed": 12}
    table = (out / "results.md").read_text()
    head = "| dataset | protocol | metric | checkpoint | random init | paper TerraFM-B |"
    assert head + " n train/val/test | warning |" in table
    assert "| 85.6 | 4/2/2 | test split of 2 samples (< 50) |" in table
    assert f"- `{data / 'geobench' / 'm-so2sat'}` (geobench): GEO-Bench task folder" in table
    assert (out / "results.png").stat().st_size > 1000
    captured = capsys.readouterr()
    assert table in captured.out


def test_feature_cache_is_keyed_by_the_checkpoint(data, checkpoint, tmp_path):
    other = tmp_path / "other.ckpt"
    pretraining_checkpoint(other, seed=2)
    eurosat = data / "eurosat"
    out = tmp_path / "shared_out"

    def run(ckpt, folder):
        main(["--ckpt", str(ckpt), "--data", str(eurosat), "--out", str(folder), *FAST])
        return json.loads((folder / "results.json").read_text())

    first = run(checkpoint, out)
    again = run(checkpoint, out)
    assert first["feature_cache"] == {"reused": 0, "computed": 4}
    assert again["feature_cache"] == {"reused": 4, "computed": 0}
    assert [r["results"] for r in again["rows"]] == [r["results"] for r in first["rows"]]
    switched = run(other, out)  # another checkpoint into the same folder
    fresh = run(other, tmp_path / "fresh")
    # The random-init baseline (same architecture, seed 0) is reused; the checkpoint's is not.
    assert switched["feature_cache"] == {"reused": 2, "computed": 2}
    digests = [r["sources"]["checkpoint"]["weights_sha256"] for r in (first, switched)]
    assert digests[0] != digests[1]
    assert [r["results"] for r in switched["rows"]] == [r["results"] for r in fresh["rows"]]
    features = [_cached(out, r, eurosat, "checkpoint", "train").features for r in (first, switched)]
    assert not torch.equal(*features)


def test_seeds_give_mean_and_std_and_geobench_is_fine_tuned(data, checkpoint, tmp_path):
    out = tmp_path / "seeds"
    main(["--ckpt", str(checkpoint), "--data", str(data / "geobench" / "m-brick-kiln")]
         + ["--out", str(out), "--seeds", "2", "--finetune-epochs", "1", *FAST])  # fmt: skip
    rows = {r["protocol"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"kNN 100%", "kNN 1%", "frozen probe", "fine-tune"}
    assert rows["fine-tune"]["paper"] == 98.7
    for protocol, row in rows.items():
        for result in row["results"].values():
            assert len(result["values"]) == (1 if protocol == "kNN 100%" else 2)
            assert result["mean"] == pytest.approx(sum(result["values"]) / len(result["values"]))
    assert " ± " in (out / "results.md").read_text()


@pytest.mark.slow
def test_upernet_only_when_asked(data, checkpoint, tmp_path):
    out = tmp_path / "upernet"
    main(["--ckpt", str(checkpoint), "--data", str(data / "floods"), "--out", str(out)]
         + ["--upernet", *FAST])  # fmt: skip
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["protocol"] for r in rows] == ["linear seg", "UPerNet seg"]


def test_released_weights_source(data, tmp_path):
    path = tmp_path / "TerraFM-Ti.pth"
    torch.save(export_released_weights(terrafm_tiny(depth=2)), path)
    out = tmp_path / "released"
    main(["--released", str(path), "--backbone", "terrafm_tiny", "--data", str(data / "eurosat")]
         + ["--backbone-kwargs", '{"depth": 2}', "--out", str(out), *FAST])  # fmt: skip
    report = json.loads((out / "results.json").read_text())
    assert list(report["sources"]) == ["released", "random init"]


def test_real_brick_kiln_overlapping_splits_are_flagged(tmp_path, checkpoint, caplog):
    root = shared_path("data", "geobench_v1", "brick_kiln_v1.0")
    out = tmp_path / "kiln"
    main(["--ckpt", str(checkpoint), "--data", str(root), "--out", str(out), *FAST])
    rows = json.loads((out / "results.json").read_text())["rows"]
    expected = [
        "5 samples in both train and val",
        "5 samples in both train and test",
        "5 samples in both val and test",
        "test split of 5 samples (< 50)",
    ]
    assert [r["warnings"] for r in rows] == [expected] * 3
    assert [r["samples"] for r in rows] == [{"train": 5, "val": 5, "test": 5}] * 3
    assert f"brick_kiln_v1.0: {expected[1]}: its numbers are not a benchmark result" in caplog.text


def test_markdown_table_renders_a_known_report():
    report = {
        "backbone": "terrafm_tiny",
        "sources": {"checkpoint": {}, "random init": {}},
        "settings": {"seeds": 2, "epochs": 1, "probe_steps": 5, "finetune_epochs": 0},
        "paper": {"model": "TerraFM-B", "source": "the paper"},
        "rows": [
            {
                "dataset": "kiln", "protocol": "kNN 100%", "metric": "top1", "paper": 94.5,
                "samples": {"train": 5, "val": 5, "test": 5}, "warnings": ["a", "b"],
                "results": {
                    "checkpoint": {"mean": 100.0, "std": 0.0, "values": [100.0, 100.0]},
                    "random init": {"mean": 60.0, "std": 0.0, "values": [60.0]},
                },
            }
        ],
        "not_evaluated": [{"path": "/d/x", "benchmark": "geobench", "reason": "why"}],
    }  # fmt: skip
    assert markdown_table(report).splitlines()[3:] == [
        "| dataset | protocol | metric | checkpoint | random init | paper TerraFM-B "
        "| n train/val/test | warning |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
        "| kiln | kNN 100% | top1 | 100.0 ± 0.0 | 60.0 | 94.5 | 5/5/5 | a; b |",
        "",
        "Not evaluated:",
        "",
        "- `/d/x` (geobench): why",
    ]


def _error(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_argument_mistakes_are_one_line(data, checkpoint, tmp_path):
    eurosat, out = str(data / "eurosat"), str(tmp_path / "out")
    missing = tmp_path / "nowhere"
    assert _error(["--ckpt", str(checkpoint), "--data", str(missing), "--out", out]) == (
        f"make eval: --data (DATA=): folder not found: {missing}"
    )
    assert _error(["--ckpt", str(tmp_path / "no.ckpt"), "--data", eurosat, "--out", out]) == (
        f"make eval: --ckpt (CKPT=): checkpoint not found: {tmp_path / 'no.ckpt'}"
    )
    truncated = truncated_copy(checkpoint, tmp_path / "cut.ckpt")
    message = _error(["--ckpt", str(truncated), "--data", eurosat, "--out", out])
    assert message.startswith(f"make eval: --ckpt (CKPT=): {truncated}: not a readable checkpoint")
    assert "\n" not in message
    released = tmp_path / "TerraFM-Ti.pth"
    torch.save(export_released_weights(terrafm_tiny(depth=2)), released)
    message = _error(["--released", str(released), "--data", eurosat, "--out", out])  # base
    assert message == (
        f"make eval: --released (RELEASED=): {released} holds a TerraFM of width 192 with 2 "
        "blocks; this model has width 768 with 12 blocks: build the matching size (terrafm_base: "
        "768 / 12, terrafm_large: 1024 / 24) (asked: terrafm_base); give the --backbone "
        "(BACKBONE=) of the file's size"
    )
    message = _error(["--ckpt", str(checkpoint), "--data", eurosat, "--out", out]
                     + ["--backbone-kwargs", '{"depth": 4}'])  # fmt: skip
    assert message == (
        f"make eval: --ckpt (CKPT=): {checkpoint}: the checkpoint's backbone has depth=2, "
        "backbone_kwargs asks depth=4; remove depth from backbone_kwargs (the checkpoint sets "
        "the architecture) or give a checkpoint of that architecture"
    )
    assert _error(["--ckpt", str(checkpoint), "--data", str(data / "notes"), "--out", out]) == (
        f"make eval: {data / 'notes'}: no benchmark found (looked for copernicus, geobench, "
        "eurosat, eurosat-sar, sen1floods11, landslide4sense, bigearthnet layouts; see "
        "docs/evaluation.md)"
    )
    assert not (tmp_path / "out").exists()  # nothing written on a mistake
    with pytest.raises(ReportError, match="checkpoint not found"):  # --debug: the traceback
        main(["--ckpt", str(tmp_path / "no.ckpt"), "--data", eurosat, "--debug"])


@pytest.mark.slow
def test_the_command_prints_one_line_and_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "terrafm_lightning.eval.report", "--data", str(tmp_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "python -m terrafm_lightning.eval.report: one of the arguments --ckpt (CKPT=) "
        "--released (RELEASED=) is required (see --help)\n"
    )


def test_make_eval_passes_every_report_option_and_only_those_set():
    from terrafm_lightning.eval.report import MAKE_VARIABLES, build_parser

    options = vars(build_parser().parse_args(["--ckpt", "c", "--data", "d"]))
    assert set(MAKE_VARIABLES) == set(options)
    values = {var: f"v{i}" for i, var in enumerate(MAKE_VARIABLES.values())}
    values |= {"UPERNET": "1", "DEBUG": "1"}
    root = Path(__file__).resolve().parents[2]

    def command(variables):
        argv = ["make", "-s", "-n", "-C", str(root), "eval"]
        argv += [f"{k}={v}" for k, v in variables.items()]
        printed = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        line = printed[printed.index("-m terrafm_lightning.eval.report") :]
        return shlex.split(line.replace("\\\n", " "))[2:]

    expected = []
    for option, var in MAKE_VARIABLES.items():
        flag = "--" + option.replace("_", "-")
        expected += [flag] if var in ("UPERNET", "DEBUG") else [flag, values[var]]
    assert sorted(command(values)) == sorted(expected)
    assert command({"CKPT": "x.ckpt", "DATA": "bench"}) == ["--ckpt", "x.ckpt", "--data", "bench"]
