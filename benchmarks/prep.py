"""Prep throughput at 534 px: today's code path vs this tree vs the decode + encode bound.

Inputs (written once): ``--cells`` Major-TOM cells of 1068 px in the real Core layout (the test
fixture: metadata.parquet + image parquets of GeoTIFF bytes per band), and the same cells as
co-registered GeoTIFF folders (``S1RTC`` / ``S2L1C`` / ``S2L2A``, one 1068 px file per cell), each
cut into 4 tiles of 534 px. Stores use 4-sample shards (one cell per shard task).

Measured side by side in one run, each in its own process, interleaved ``--repeat`` times:

- ``before``: the code at commit ``--baseline`` (default 8a8ca8f), extracted with ``git archive``
  to a temporary folder (kept out of the tree);
- ``now``: this tree's ``src``;
- ``now, no chunk checksums``: this tree writing stores without the crc32c codec in the chunk
  chain (as before chunk checksums): the checksum's cost is ``now`` / this in CPU time
  (goal: <= 3% of prep's CPU time); ``--checksum-only`` runs just these two;
- ``bound``: only decoding the same source bytes (every band GeoTIFF, already in memory, read
  with this tree's GDAL settings) and encoding the same output (every 534 px tile chunk with the
  store's blosc codec, one blosc thread as the prep workers), no other work.

All three run in process (``--scheduler sync``: one worker), each timed on its second pass over
the inputs in its process (the first pays one-off costs a long run pays once: GDAL and PROJ
set-up, codec registries, heap growth; decode caches are cleared in between). Then a cProfile of
each path (before and now) gives the share of time per stage, and 1 vs 2 dask workers
(``LocalCluster``, 1 thread per worker, started and warmed up by a first pass before timing)
gives the scaling.
Usage:
``python benchmarks/prep.py [--cells 6] [--repeat 3] [--checksum-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TILE, CELL = 534, 1068

RUN = textwrap.dedent(
    """
    import cProfile, json, os, sys, time
    from terrafm_lightning.prep.sources import geotiff, majortom
    from terrafm_lightning.store.format import Encoding
    path, source, out, profile, checksum = sys.argv[1:6]
    extra = {} if checksum == "1" else {"chunk_checksum": False}
    encoding = Encoding(samples_per_shard=4, **extra)
    options = dict(scheduler="sync", progress=False, encoding=encoding)
    if path == "majortom":
        job = lambda o: majortom.prepare_majortom(json.loads(source), o, 534, 1068, **options)
    else:
        job = lambda o: geotiff.prepare_geotiff(source, o, 534, **options)
    job(out + ".warm")  # the process's first-use costs (GDAL, PROJ, codecs, heap), paid once
    for cached in ("decode_cell", "decode_location"):  # nothing decoded may carry over
        for module in (geotiff, majortom):
            getattr(getattr(module, cached, None), "cache_clear", lambda: None)()
    profiler = cProfile.Profile()
    cpu, start = time.process_time(), time.perf_counter()
    if profile != "-":
        profiler.enable()
    report = job(out)
    wall = time.perf_counter() - start
    if profile != "-":
        profiler.disable()
        profiler.dump_stats(profile)
    print(json.dumps({"tiles": report.done, "wall": wall, "cpu": time.process_time() - cpu}))
    """
)

BOUND = textwrap.dedent(
    """
    import json, sys, time
    import numcodecs, numpy as np, pyarrow.parquet as pq, rasterio, zarr
    from rasterio.io import MemoryFile
    from terrafm_lightning.prep.raster import GDAL_READ_OPTIONS
    from terrafm_lightning.store.schema import Encoding
    path, source, store = sys.argv[1:4]
    if path == "majortom":
        from terrafm_lightning.prep.sources.majortom import COLUMNS
        blobs = []
        for m, root in json.loads(source).items():
            table = pq.read_table(f"{root}/images/part.parquet", columns=list(COLUMNS[m]))
            blobs += [v for c in table.column_names for v in table.column(c).to_pylist()]
    else:
        from pathlib import Path
        blobs = [p.read_bytes() for p in sorted(Path(source).rglob("*.tif"))]
    root = zarr.open_group(store, mode="r")
    tiles = [np.ascontiguousarray(root[m][i]) for m in root.attrs["modalities"]
             for i in range(root["written"].shape[0])]
    e = Encoding()
    codec = numcodecs.Blosc(e.cname, e.clevel, numcodecs.Blosc.BITSHUFFLE)
    numcodecs.blosc.use_threads = False  # one thread, as the prep workers
    for warm in (True, False):  # the first pass pays the process's first-use costs
        start, cpu = time.perf_counter(), time.process_time()
        with rasterio.Env(**GDAL_READ_OPTIONS):  # the fastest GDAL reads known here
            for blob in blobs:
                with MemoryFile(blob) as mem, mem.open(driver="GTiff") as src:
                    src.read()
        decode = time.perf_counter() - start
        for tile in tiles:
            codec.encode(tile)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu
    n = root["written"].shape[0]
    print(json.dumps({"tiles": n, "wall": total, "cpu": cpu, "decode": decode,
                      "encode": total - decode}))
    """
)

STAGES = {
    "parquet read": ("_row",),
    "GeoTIFF decode": ("decode_cell", "read_geotiff"),
    "reprojection": ("align",),
    "nodata / radiometry": (
        "linear_to_db",
        "harmonise_s2",
        "to_store_units",
        "s1_to_db",
        "s2_to_dn",
        "nodata_mask",
    ),
    "tile metadata": ("sample_record", "tile_centre"),
    "encode + write (zarr shards)": ("write_pixels",),
    "bookkeeping (metadata, resume)": ("flush_records", "write_records"),
    "store create / finish (once a run)": (
        "create_or_resume",
        "update_class_frequencies",
        "plan_cells",
        "plan_geotiffs",
    ),
}
"""Stage -> functions (by name) whose time it holds; a stage's time excludes the other stages'
functions called inside it (decode_cell calls _row and harmonise_s2, for example). A function
listed must not also run below another listed function of the same stage through unlisted ones
(it would count twice): the final ``consolidate`` is left in "other" for that reason."""


def stage_shares(profile: str) -> dict[str, float]:
    """Share of the run's time per stage, from a cProfile dump."""
    stats = pstats.Stats(profile).stats
    cumulative: dict[str, float] = {}
    inner: dict[str, float] = {}
    owner = {f: s for s, functions in STAGES.items() for f in functions}
    total = max(ct for (_, _, name), (_, _, _, ct, _) in stats.items())
    for (_, _, name), (_, _, _, _, callers) in stats.items():
        stage = owner.get(name)
        if stage is None:
            continue
        # Only the outermost call of a stage counts; inner calls from another stage move there.
        outside = sum(c[3] for (_, _, caller), c in callers.items() if owner.get(caller) != stage)
        cumulative[stage] = cumulative.get(stage, 0.0) + outside
        for (_, _, caller), c in callers.items():
            if owner.get(caller) not in (None, stage):
                inner[owner[caller]] = inner.get(owner[caller], 0.0) + c[3]
    shares = {s: (cumulative.get(s, 0.0) - inner.get(s, 0.0)) / total for s in STAGES}
    shares["other (driver, zarr open, ...)"] = 1 - sum(shares.values())
    return shares


def run(code: str, src: Path, *args: str) -> dict[str, float]:
    """Run ``code`` in a fresh process importing ``terrafm_lightning`` from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _clear_decode_caches() -> None:
    """Empty the per-process caches of decoded inputs (run on each dask worker)."""
    from terrafm_lightning.prep.sources import geotiff, majortom

    majortom.decode_cell.cache_clear()
    geotiff.decode_location.cache_clear()


def scaling(roots: dict[str, str], geo: Path, tmp: Path) -> dict[str, dict[int, float]]:
    """Tiles/s of this tree with 1 and 2 dask workers (cluster start-up excluded)."""
    import importlib

    from distributed import Client

    sys.path.insert(0, str(REPO / "src"))
    from terrafm_lightning.prep.driver import local_cluster
    from terrafm_lightning.prep.sources.geotiff import prepare_geotiff
    from terrafm_lightning.prep.sources.majortom import prepare_majortom
    from terrafm_lightning.store.schema import Encoding

    encoding = Encoding(samples_per_shard=4)
    jobs = {
        "majortom": lambda out, a: prepare_majortom(
            roots, out, TILE, CELL, scheduler=a, progress=False, encoding=encoding
        ),
        "geotiff": lambda out, a: prepare_geotiff(
            str(geo), out, TILE, scheduler=a, progress=False, encoding=encoding
        ),
    }
    rates: dict[str, dict[int, float]] = {name: {} for name in jobs}
    for workers in (1, 2):
        with local_cluster(workers) as cluster, Client(cluster) as client:
            for module in ("geotiff", "majortom"):
                client.run(importlib.import_module, f"terrafm_lightning.prep.sources.{module}")
            for name, job in jobs.items():
                # A first pass warms every worker up, as in the single-process runs.
                job(str(tmp / f"scale_{name}{workers}_warm.zarr"), cluster.scheduler_address)
                client.run(_clear_decode_caches)
                start = time.perf_counter()
                report = job(str(tmp / f"scale_{name}{workers}.zarr"), cluster.scheduler_address)
                rates[name][workers] = report.done / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=6, help="1068 px cells (4 tiles each)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs per variant")
    parser.add_argument("--baseline", default="8a8ca8f", help="commit of 'before'")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 1 vs 2 workers run")
    parser.add_argument(
        "--checksum-only", action="store_true", help="only now vs now without chunk checksums"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.generators import majortom as fixture

    fixture.CELL = CELL
    fixture.CELLS = [f"{10 + k}U_20R" for k in range(args.cells)]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        start = time.perf_counter()
        roots = {m: str(p) for m, p in fixture.write_fixture(tmp / "mt").items()}
        geo = fixture.write_geotiff_cells(tmp / "geo")
        print(f"inputs: {args.cells} cells of {CELL} px -> {4 * args.cells} tiles of {TILE} px "
              f"({time.perf_counter() - start:.0f} s to write)")  # fmt: skip
        old = tmp / "old"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline, "src"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        sources = {"before": (old / "src", "1"), "now": (REPO / "src", "1")}
        sources["unchecked"] = (REPO / "src", "0")
        if args.checksum_only:
            del sources["before"]
        inputs = {"majortom": json.dumps(roots), "geotiff": str(geo)}
        results: dict[tuple[str, str], list[dict[str, float]]] = {}
        for r in range(args.repeat):
            for path, source in inputs.items():
                for variant, (src, checksum) in sources.items():
                    out = str(tmp / f"{path}_{variant}_{r}.zarr")
                    results.setdefault((path, variant), []).append(
                        run(RUN, src, path, source, out, "-", checksum)
                    )
                if args.checksum_only:
                    continue
                store = str(tmp / f"{path}_now_{r}.zarr")
                results.setdefault((path, "bound"), []).append(
                    run(BOUND, REPO / "src", path, source, store)
                )
        shares = {}
        for path, source in inputs.items():
            for variant in () if args.checksum_only else ("before", "now"):
                src, checksum = sources[variant]
                dump = str(tmp / f"{path}_{variant}.prof")
                out = str(tmp / f"{path}_{variant}_p.zarr")
                run(RUN, src, path, source, out, dump, checksum)
                shares[path, variant] = stage_shares(dump)
        skip_scaling = args.no_scaling or args.checksum_only
        rates = None if skip_scaling else scaling(roots, geo, tmp)
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; rates are "
        f"medians of {args.repeat} interleaved runs of one process (wall, then CPU time)"
    )
    for path in inputs:
        cost = statistics.median(
            now["cpu"] / now["tiles"] / (unchecked["cpu"] / unchecked["tiles"])
            for now, unchecked in zip(results[path, "now"], results[path, "unchecked"], strict=True)
        )
        print(
            f"{path:8s} chunk checksum cost, prep CPU time per tile with / without: "
            f"{cost:.3f} (goal <= 1.03)"
        )
        if args.checksum_only:
            continue
        rate = {
            v: statistics.median(r["tiles"] / r["wall"] for r in results[path, v])
            for v in ("before", "now", "bound")
        }
        cpu = {
            v: statistics.median(r["tiles"] / r["cpu"] for r in results[path, v])
            for v in ("before", "now", "bound")
        }
        bound = results[path, "bound"]
        encode = statistics.median(r["encode"] / r["tiles"] for r in bound)
        decode = statistics.median(r["decode"] / r["tiles"] for r in bound)
        print(
            f"{path:8s} before {rate['before']:5.2f}  now {rate['now']:5.2f}  bound "
            f"{rate['bound']:5.2f} tiles/s   now/before {rate['now'] / rate['before']:.2f}x "
            f"(goal >= 3x)   now/bound {rate['now'] / rate['bound']:.2f}"
        )
        print(
            f"{'':8s} CPU tiles/s: before {cpu['before']:5.2f}  now {cpu['now']:5.2f}  bound "
            f"{cpu['bound']:5.2f}   now/before {cpu['now'] / cpu['before']:.2f}x   now/bound "
            f"{cpu['now'] / cpu['bound']:.2f}   bound/before {cpu['bound'] / cpu['before']:.2f}x   "
            f"(bound per tile, wall: decode {decode * 1e3:.0f} ms + encode {encode * 1e3:.0f} ms)"
        )
        for stage in shares[path, "now"]:
            print(
                f"    {stage:32s} before {shares[path, 'before'][stage]:6.1%}   now "
                f"{shares[path, 'now'][stage]:6.1%}"
            )
    if rates is not None:
        for name, rate in rates.items():
            print(
                f"{name:8s} dask 1 worker {rate[1]:5.2f} tiles/s, 2 workers {rate[2]:5.2f} "
                f"tiles/s: {rate[2] / rate[1]:.2f}x (goal >= 1.8x on an idle machine)"
            )


if __name__ == "__main__":
    main()
