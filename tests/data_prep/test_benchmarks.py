"""The benchmark recipes, tested as torchgeo tests its downloaders: the URL pointed at a loopback
server serving a fixture archive whose checksum the recipe checks."""

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from torchgeo.datasets.copernicus import CopernicusBenchEuroSATS1

from data_prep import benchmarks
from data_prep.benchmarks import BENCHMARKS, main
from terrafm_lightning.prep import fetch
from tests.generators.benchmarks import write_geobench
from tests.generators.copernicus import write_copernicus
from tests.generators.http_server import serve


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> str:
    """Zip ``folder``'s files (member names ``prefix`` + path in folder); returns md5:<hex>."""
    with zipfile.ZipFile(archive, "w") as zf:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(file, prefix + file.relative_to(folder).as_posix())
    return "md5:" + hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture
def eurosat_s1(tmp_path, monkeypatch):
    """eurosat_s1.zip as Copernicus-Bench publishes it, served; torchgeo's URL/md5 point at it."""
    write_copernicus(tmp_path / "src", "eurosat_s1")
    served = tmp_path / "served"
    served.mkdir()
    checksum = zip_folder(tmp_path / "src", served / "eurosat_s1.zip")
    monkeypatch.setattr(fetch, "FIRST_DELAY", 0.01)
    with serve(served) as srv:
        monkeypatch.setattr(CopernicusBenchEuroSATS1, "url", f"{srv.url}/eurosat_s1.zip")
        monkeypatch.setattr(CopernicusBenchEuroSATS1, "md5", checksum.removeprefix("md5:"))
        yield srv, served / "eurosat_s1.zip"


def test_copernicus_task_fetched_verified_laid_out_and_not_fetched_again(
    eurosat_s1, tmp_path, capsys
):
    server, archive = eurosat_s1
    data = tmp_path / "data"
    assert main([str(data), "copernicus-eurosat_s1", "--no-progress"]) == 0
    assert capsys.readouterr().out == (
        f"copernicus-eurosat_s1: fetched and verified in {data / 'copernicus_bench'}\n"
    )
    assert server.bytes_sent() == archive.stat().st_size
    # The layout make eval detects, read through torchgeo's own class.
    from terrafm_lightning.eval.report import detect

    found = detect(data / "copernicus_bench", "copernicus_bench")
    assert [f.name for f in found] == ["copernicus_bench/eurosat_s1"]
    ds = CopernicusBenchEuroSATS1(str(data / "copernicus_bench"), split="train")
    assert len(ds) > 0
    assert not (data / ".downloads" / "copernicus-eurosat_s1").exists()
    server.clear()
    assert main([str(data), "copernicus-eurosat_s1", "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert server.requests() == []


def test_corrupted_archive_is_refused_and_named(eurosat_s1, tmp_path, capsys):
    _, archive = eurosat_s1
    blob = bytearray(archive.read_bytes())
    blob[100] ^= 0xFF
    archive.write_bytes(bytes(blob))
    data = tmp_path / "data"
    assert main([str(data), "copernicus-eurosat_s1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("data-benchmarks: error: http://127.0.0.1:")
    assert "/eurosat_s1.zip: md5 " in err[0] and "does not match the published" in err[0]
    assert not list((data / ".downloads").rglob("*.part"))  # the bad bytes are not kept
    assert not list(data.rglob(".terrafm-fetched-*"))


def test_interrupted_fetch_is_resumed(eurosat_s1, tmp_path, monkeypatch):
    server, archive = eurosat_s1
    monkeypatch.setattr(fetch, "CHUNK_BYTES", 4096)
    data = tmp_path / "data"
    part = data / ".downloads" / "copernicus-eurosat_s1" / "eurosat_s1.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive.read_bytes()[:5000])  # what a killed run left
    server.cut["/eurosat_s1.zip"] = 1000  # and this run's first transfer breaks off too
    assert main([str(data), "copernicus-eurosat_s1", "--no-progress"]) == 0
    size = archive.stat().st_size
    # The 5000 bytes on disk are not fetched again; the broken-off 1000 are retried.
    assert server.bytes_sent() == size - 5000 + 1000
    assert all(s.start >= 5000 for s in server.requests("/eurosat_s1.zip", "GET"))
    assert (data / "copernicus_bench" / "eurosat_s1" / "eurosat-train.txt").is_file()


def test_partial_extraction_is_redone(eurosat_s1, tmp_path):
    data = tmp_path / "data"
    assert main([str(data), "copernicus-eurosat_s1", "--no-progress"]) == 0
    split = data / "copernicus_bench" / "eurosat_s1" / "eurosat-train.txt"
    text = split.read_text()
    split.unlink()
    (data / "copernicus_bench" / ".terrafm-fetched-copernicus-eurosat_s1.json").unlink()
    assert main([str(data), "copernicus-eurosat_s1", "--no-progress"]) == 0
    assert split.read_text() == text


def test_geobench_task_from_its_zenodo_record(tmp_path, monkeypatch):
    """The record API lists files and md5s; the zip's nested members are extracted flat."""
    write_geobench(tmp_path / "task", n=6)
    served = tmp_path / "served"
    (served / "records").mkdir(parents=True)
    (served / "files").mkdir()
    checksum = zip_folder(tmp_path / "task", served / "files" / "m-brick-kiln.zip", "nested/x/")
    with serve(served) as srv:
        record = {
            "files": [
                {
                    "key": "m-brick-kiln.zip",
                    "checksum": checksum,
                    "links": {"self": f"{srv.url}/files/m-brick-kiln.zip"},
                }
            ]
        }
        (served / "records" / "8276814").write_text(json.dumps(record))
        data = tmp_path / "data"
        args = [str(data), "geobench-m-brick-kiln", "--no-progress"]
        assert main([*args, "--zenodo-api", f"{srv.url}/records"]) == 0
    task = data / "geobench" / "classification_v0.9.1" / "m-brick-kiln"
    assert sorted(p.name for p in task.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in (tmp_path / "task").iterdir()
    )


def test_geobench_record_with_a_layout_eval_cannot_read_is_not_marked_done(tmp_path, capsys):
    served = tmp_path / "served"
    (served / "records").mkdir(parents=True)
    (served / "readme.txt").write_text("not a dataset")
    checksum = "md5:" + hashlib.md5(b"not a dataset").hexdigest()
    with serve(served) as srv:
        record = {"files": [{"key": "readme.txt", "checksum": checksum,
                             "links": {"self": f"{srv.url}/readme.txt"}}]}  # fmt: skip
        (served / "records" / "8276814").write_text(json.dumps(record))
        data = tmp_path / "data"
        code = main([str(data), "geobench-m-brick-kiln", "--no-progress", "--zenodo-api",
                     f"{srv.url}/records"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "is not in a layout make eval reads" in err and "\n" not in err
    assert not list(data.rglob(".terrafm-fetched-*"))


def test_unknown_benchmark_is_one_line_listing_the_known(tmp_path, capsys):
    assert main([str(tmp_path), "m-eurosatt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("data-benchmarks: error: unknown benchmark 'm-eurosatt'; known: ")
    assert "geobench-m-eurosat" in err and "\n" not in err
    assert not any(tmp_path.iterdir())


def test_groups_and_paper_coverage():
    names = [b.name for b in benchmarks.resolve(["geobench"])]
    assert names == [
        "geobench-m-eurosat", "geobench-m-bigearthnet", "geobench-m-so2sat",
        "geobench-m-brick-kiln", "geobench-m-cashew-plantation", "geobench-m-SA-crop-type",
    ]  # fmt: skip
    tasks = {d.rsplit("/", 1)[1] for n in benchmarks.COPERNICUS for d in BENCHMARKS[n].detects}
    assert tasks == {"cloud_s2", "eurosat_s1", "eurosat_s2", "bigearthnet_s1", "bigearthnet_s2",
                     "dfc2020_s1", "dfc2020_s2", "lcz_s2"}  # fmt: skip
    assert "landslide4sense" in BENCHMARKS


def test_copernicus_recipes_use_torchgeos_urls_and_md5s():
    from torchgeo.datasets.copernicus import CopernicusBenchLCZS2

    lcz = benchmarks.downloads(BENCHMARKS["copernicus-lcz_s2"])
    assert [(d.name, d.checksum) for d in lcz] == [
        (f"lcz_{s}.h5", f"md5:{md5}") for s, md5 in CopernicusBenchLCZS2.md5s.items()
    ]
    assert lcz[0].url == CopernicusBenchLCZS2.url.format("train")
    (cloud,) = benchmarks.downloads(BENCHMARKS["copernicus-cloud_s2"])
    from torchgeo.datasets.copernicus import CopernicusBenchCloudS2

    assert cloud == benchmarks.Download(
        CopernicusBenchCloudS2.url, "cloud_s2.zip", f"md5:{CopernicusBenchCloudS2.md5}"
    )


def test_archive_member_outside_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(benchmarks.InputError, match=r"member '\.\./escape\.txt' would land"):
        benchmarks.extract(archive, tmp_path / "out", flat=False)
    assert not (tmp_path / "escape.txt").exists()
