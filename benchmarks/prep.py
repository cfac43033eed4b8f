"""Prep throughput (tiles/s) of ``majortom`` and ``geotiff`` with 1 and 2 dask workers.

Each worker count gets one ``LocalCluster`` (1 thread per worker process), started and warmed up
(workers import the prep modules) before timing; the preps then join it through its scheduler
address (``--scheduler ADDRESS``), so the rates exclude cluster start-up, which is printed apart.
majortom: the parquet fixture of the tests (real Core column layout, GeoTIFF bytes per band) with
``--cells`` cells of ``--cell-size`` px cut into 4 tiles. geotiff: the real TerraMind examples
(5 x 224 px) repeated ``--repeat`` times. Usage: ``python benchmarks/prep.py``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from distributed import Client, LocalCluster

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from terrafm_lightning.prep.sources.geotiff import prepare_geotiff  # noqa: E402
from terrafm_lightning.prep.sources.majortom import prepare_majortom  # noqa: E402
from tests.generators import majortom as fixture  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "terramind_examples"
PREP_MODULES = ("terrafm_lightning.prep.sources.geotiff", "terrafm_lightning.prep.sources.majortom")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=48, help="Major-TOM fixture cells")
    parser.add_argument("--cell-size", type=int, default=256, help="cell size in pixels")
    parser.add_argument("--repeat", type=int, default=24, help="copies of the 5 GeoTIFF examples")
    args = parser.parse_args()
    fixture.CELL = args.cell_size
    fixture.CELLS = [f"{10 + k}U_20R" for k in range(args.cells)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        roots = {m: str(p) for m, p in fixture.write_fixture(root / "mt").items()}
        for folder in ("S1RTC", "S2L1C", "S2L2A"):
            (root / "geo" / folder).mkdir(parents=True)
            for k in range(args.repeat):
                for f in sorted((SHARED / folder).glob("*.tif")):
                    shutil.copy(f, root / "geo" / folder / f"{f.stem}_r{k}.tif")
        jobs = {
            "majortom": lambda out, address: prepare_majortom(
                roots,
                out,
                args.cell_size // 2,
                args.cell_size,
                scheduler=address,
                progress=False,
            ),
            "geotiff": lambda out, address: prepare_geotiff(
                str(root / "geo"), out, scheduler=address, progress=False
            ),
        }
        print(
            f"majortom: {args.cells} cells of {args.cell_size} px -> {4 * args.cells} tiles of "
            f"{args.cell_size // 2} px; geotiff: {5 * args.repeat} tiles of 224 px "
            "(LocalCluster start-up excluded, 1 thread per worker); "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
        )
        rates: dict[str, dict[int, float]] = {name: {} for name in jobs}
        for workers in (1, 2):
            start = time.perf_counter()
            with (
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                ) as cluster,
                Client(cluster) as client,
            ):
                for module in PREP_MODULES:
                    client.run(importlib.import_module, module)
                print(f"{workers} worker(s): cluster start-up {time.perf_counter() - start:.1f} s")
                for name, job in jobs.items():
                    start = time.perf_counter()
                    report = job(str(root / f"{name}{workers}.zarr"), cluster.scheduler_address)
                    rates[name][workers] = report.done / (time.perf_counter() - start)
        for name, rate in rates.items():
            print(
                f"{name:9s} 1 worker {rate[1]:6.1f} tiles/s   2 workers {rate[2]:6.1f} "
                f"tiles/s   ratio {rate[2] / rate[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
