"""``make data-benchmarks DATA=... [NAMES=...]``: the paper's benchmarks, fetched and verified.

Each recipe knows where a dataset is published and its checksums, never guessed:

- Copernicus-Bench tasks: the URL and md5 of torchgeo's own ``CopernicusBench*`` class (the
  installed torchgeo's ``DATASET_REGISTRY``), extracted where torchgeo extracts them, so
  ``DATA/copernicus_bench`` is the ``root`` torchgeo (and ``make eval``) read.
- GEO-Bench tasks (torchgeo has no GEO-Bench class): the Zenodo records the official
  ``geobench-download`` script names (GEO-Bench v0.9.1), whose file list and md5 checksums come
  from the Zenodo record API; archives are extracted flat into the task folder, as that script
  does.
- Landslide4Sense (no torchgeo class): the authors' Zenodo record (DOI 10.5281/zenodo.10463239),
  file list and md5 checksums from the record API.

A dataset is done when its folder holds ``.terrafm-fetched-<name>.json`` (written last, naming every
file and checksum). A done dataset is not fetched again; anything else is fetched (resuming
``*.part`` downloads), verified, extracted anew and checked against the layout ``make eval``
detects (:func:`terrafm_lightning.eval.report.detect`) before the marker is written.
"""

from __future__ import annotations

import argparse
import json
import posixpath
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import fsspec
from tqdm import tqdm

from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.fetch import fetch_file, read_bytes, with_retries

ZENODO_API = "https://zenodo.org/api/records"
"""Where Zenodo records are described (files, links, checksums)."""
MARKER = ".terrafm-fetched-{}.json"
"""Written last in a dataset's folder (per recipe): what was fetched, with checksums."""


@dataclass(frozen=True)
class Download:
    """One published file: URL, file name and ``"md5:<hex>"`` checksum."""

    url: str
    name: str
    checksum: str


@dataclass(frozen=True)
class Benchmark:
    """A dataset the paper reports and how to get it.

    Attributes:
        name: recipe name (``NAMES=``).
        folder: where it lands under ``DATA``.
        source: where it is published.
        licence: its licence as published.
        size: download size (as published).
        detects: the names :func:`eval.report.detect` must find in ``folder`` afterwards.
        flat: extract archive members by file name only (GEO-Bench's upload nests them).
    """

    name: str
    folder: str
    source: str
    licence: str
    size: str
    detects: tuple[str, ...]
    flat: bool = False


COPERNICUS = {
    "copernicus-cloud_s2": ("cloud_s2",),
    "copernicus-eurosat_s1": ("eurosat_s1",),
    "copernicus-eurosat_s2": ("eurosat_s2",),
    "copernicus-bigearthnet": ("bigearthnet_s1", "bigearthnet_s2"),
    "copernicus-dfc2020": ("dfc2020_s1", "dfc2020_s2"),
    "copernicus-lcz_s2": ("lcz_s2",),
}
"""Recipe -> the Copernicus-Bench tasks (torchgeo names) its archive holds."""
GEOBENCH = {
    "m-eurosat": ("classification", "8276932"),
    "m-bigearthnet": ("classification", "8277476"),
    "m-so2sat": ("classification", "8276566"),
    "m-brick-kiln": ("classification", "8276814"),
    "m-cashew-plantation": ("segmentation", "8277065"),
    "m-SA-crop-type": ("segmentation", "8277133"),
}
"""GEO-Bench task -> (benchmark, Zenodo record) from ServiceNow/geo-bench geobench_download.py."""
GEOBENCH_VERSION = "v0.9.1"
LANDSLIDE4SENSE_RECORD = "10463239"

BENCHMARKS: dict[str, Benchmark] = {
    **{
        name: Benchmark(
            name,
            "copernicus_bench",
            "Copernicus-Bench (Wang et al. 2025), hf.co/datasets/wangyi111/Copernicus-Bench "
            "via torchgeo",
            "not verified here: see the Hugging Face dataset card",
            "not published; --list asks the source",
            tuple(f"copernicus_bench/{t}" for t in tasks),
        )
        for name, tasks in COPERNICUS.items()
    },
    **{
        f"geobench-{task}": Benchmark(
            f"geobench-{task}",
            f"geobench/{kind}_{GEOBENCH_VERSION}/{task}",
            f"GEO-Bench {GEOBENCH_VERSION} (Lacoste et al. 2023), zenodo.org/records/{record}",
            "see the Zenodo record (each source dataset's licence applies)",
            "all 12 GEO-Bench tasks ~65 GB with archives, 57 GB extracted (geo-bench README)",
            (f"geobench/{kind}_{GEOBENCH_VERSION}/{task}",),
            flat=True,
        )
        for task, (kind, record) in GEOBENCH.items()
    },
    "landslide4sense": Benchmark(
        "landslide4sense",
        "landslide4sense",
        f"Landslide4Sense (Ghorbanzadeh et al. 2022), zenodo.org/records/{LANDSLIDE4SENSE_RECORD}",
        "as stated on the Zenodo record",
        "not published; --list asks the source",
        ("landslide4sense",),
    ),
}


def downloads(benchmark: Benchmark, zenodo_api: str = ZENODO_API) -> list[Download]:
    """The files of ``benchmark`` with their published checksums.

    Raises:
        InputError: the record cannot be read or lists no checksummed files.
    """
    if benchmark.name in COPERNICUS:
        from torchgeo.datasets.copernicus import DATASET_REGISTRY

        cls = DATASET_REGISTRY[COPERNICUS[benchmark.name][0]]
        if hasattr(cls, "md5s"):  # one file per split (LCZ-S2)
            return [
                Download(cls.url.format(s), cls.filename.format(s), f"md5:{md5}")
                for s, md5 in cls.md5s.items()
            ]
        return [Download(cls.url, cls.zipfile, f"md5:{cls.md5}")]
    if benchmark.name.startswith("geobench-"):
        record = GEOBENCH[benchmark.name.removeprefix("geobench-")][1]
    else:
        record = LANDSLIDE4SENSE_RECORD
    return zenodo_files(f"{zenodo_api.rstrip('/')}/{record}")


def zenodo_files(url: str) -> list[Download]:
    """The files of a Zenodo record (its API JSON): key, download link, md5 checksum."""
    try:
        files = json.loads(read_bytes(url))["files"]
        found = [Download(f["links"]["self"], f["key"], f["checksum"]) for f in files]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{url}: not a Zenodo record with files ({err})") from err
    if not found:
        raise InputError(f"{url}: the record lists no files")
    return found


def remote_size(url: str) -> int:
    """Size in bytes of a published file (asks the server)."""
    fs, inner = fsspec.core.url_to_fs(url)
    return with_retries(lambda: fs.size(inner), url)


def is_done(marker: Path, files: Sequence[Download]) -> bool:
    """Whether ``marker`` records a complete, verified copy of exactly ``files``."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("files") == {f.name: f.checksum for f in files}


def extract(archive: Path, target: Path, flat: bool) -> None:
    """Unpack a zip or tar archive into ``target`` (members by file name when ``flat``).

    Raises:
        InputError: a member would land outside ``target``, or the archive is unreadable.
    """
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = [(m.filename, m) for m in zf.infolist() if not m.is_dir()]
                for name, member in members:
                    dest = _member_path(target, name, flat, archive)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, dest.open("wb") as out:
                        shutil.copyfileobj(src, out)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    if not member.isfile():
                        continue
                    dest = _member_path(target, member.name, flat, archive)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with tf.extractfile(member) as src, dest.open("wb") as out:
                        shutil.copyfileobj(src, out)
        else:
            shutil.copy2(archive, target / archive.name)  # a plain file (HDF5...)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
        raise InputError(f"{archive}: cannot extract: {err}") from err


def _member_path(target: Path, name: str, flat: bool, archive: Path) -> Path:
    parts = posixpath.normpath(name).split("/")
    if name.startswith("/") or ".." in parts:
        raise InputError(f"{archive}: member {name!r} would land outside {target}; refused")
    return target / (parts[-1] if flat else Path(*parts))


def fetch_benchmark(
    benchmark: Benchmark,
    data: Path,
    zenodo_api: str = ZENODO_API,
    keep_archives: bool = False,
    progress: bool = True,
) -> bool:
    """Fetch, verify, extract and check one benchmark under ``data``; idempotent.

    Returns:
        Whether anything was done (False: already complete and verified).

    Raises:
        InputError: a source is unreachable, a checksum differs, or the extracted files are not
            in the layout ``make eval`` reads.
    """
    from terrafm_lightning.eval.report import detect

    files = downloads(benchmark, zenodo_api)
    target = data / benchmark.folder
    marker = target / MARKER.format(benchmark.name)
    if is_done(marker, files):
        return False
    marker.unlink(missing_ok=True)
    archives = data / ".downloads" / benchmark.name
    for f in files:
        archive = archives / f.name
        with tqdm(desc=f.name, unit="B", unit_scale=True, disable=not progress) as bar:
            fetch_file(f.url, archive, f.checksum, bar.update)
        target.mkdir(parents=True, exist_ok=True)
        extract(archive, target, benchmark.flat)
    root = data / benchmark.folder.split("/")[0]
    found = {d.name for d in _detect_all(root, detect)}
    if missing := [d for d in benchmark.detects if d not in found]:
        raise InputError(
            f"{benchmark.name}: after extraction {target} is not in a layout make eval reads "
            f"({missing} not found; found {sorted(found) or 'nothing'}); report this recipe"
        )
    marker.write_text(
        json.dumps({"benchmark": benchmark.name, "files": {f.name: f.checksum for f in files}})
    )
    if not keep_archives:
        shutil.rmtree(archives)
    return True


def _detect_all(root: Path, detect: Callable) -> list:
    """Every dataset ``make eval`` would find at or under ``root`` (its own search)."""
    found, frontier = [], [root]
    while frontier:
        folder = frontier.pop()
        name = folder.relative_to(root.parent).as_posix()
        hits = detect(folder, name)
        found += hits
        if not hits:
            frontier += [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return found


def resolve(names: Sequence[str]) -> list[Benchmark]:
    """The benchmarks named (all for none); ``geobench`` / ``copernicus`` name a whole group.

    Raises:
        InputError: an unknown name (the message lists the known ones).
    """
    if not names:
        return list(BENCHMARKS.values())
    chosen: dict[str, Benchmark] = {}
    for name in names:
        group = [b for n, b in BENCHMARKS.items() if n.startswith(f"{name}-")]
        if name in BENCHMARKS:
            group = [BENCHMARKS[name]]
        if not group:
            raise InputError(
                f"unknown benchmark {name!r}; known: geobench, copernicus, " + ", ".join(BENCHMARKS)
            )
        chosen |= {b.name: b for b in group}
    return list(chosen.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: one line per dataset; errors are one line and exit status 2."""
    parser = argparse.ArgumentParser(
        prog="data_prep/benchmarks.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("data", type=Path, help="folder the benchmarks go into (DATA of make eval)")
    parser.add_argument(
        "names", nargs="*", help=f"benchmarks (default: all): {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--zenodo-api", default=ZENODO_API, help="Zenodo records API (a mirror)")
    parser.add_argument("--keep-archives", action="store_true", help="keep the downloaded files")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--list", action="store_true", help="list the benchmarks, their files and sizes, and exit"
    )
    args = parser.parse_args(argv)
    try:
        chosen = resolve(args.names)
        if args.list:
            for b in chosen:
                print(f"{b.name}: {b.source}; licence {b.licence}; {b.size} -> DATA/{b.folder}")
                for f in downloads(b, args.zenodo_api):
                    print(f"  {f.name}: {remote_size(f.url) / 1e9:.2f} GB, {f.checksum}")
            return 0
        for b in chosen:
            fetched = fetch_benchmark(
                b, args.data, args.zenodo_api, args.keep_archives, not args.no_progress
            )
            state = "fetched and verified" if fetched else "already complete (verified before)"
            print(f"{b.name}: {state} in {args.data / b.folder}")
    except InputError as err:
        print(f"data-benchmarks: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
