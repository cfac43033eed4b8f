"""Prep throughput (tiles/s) of ``majortom`` and ``geotiff`` with 1 and 2 dask workers.

majortom: the parquet fixture of the tests (real Core column layout, GeoTIFF bytes per band) with
``--cells`` cells of ``--cell-size`` px cut into 4 tiles. geotiff: the real TerraMind examples
(5 x 224 px) repeated ``--repeat`` times. Usage: ``python benchmarks/prep.py``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from terrafm_lightning.data.geotiff import prepare_geotiff  # noqa: E402
from terrafm_lightning.data.majortom import prepare_majortom  # noqa: E402
from tests import test_prep_majortom as fixture  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "terramind_examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cells", type=int, default=16)
    parser.add_argument("--cell-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=8)
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
            "majortom": lambda out, w: prepare_majortom(
                roots, out, args.cell_size // 2, args.cell_size, workers=w, progress=False
            ),
            "geotiff": lambda out, w: prepare_geotiff(
                str(root / "geo"), out, workers=w, progress=False
            ),
        }
        print(
            f"majortom: {args.cells} cells of {args.cell_size} px -> {4 * args.cells} tiles; "
            f"geotiff: {5 * args.repeat} tiles of 224 px (LocalCluster start included)"
        )
        for name, job in jobs.items():
            rates = {}
            for workers in (1, 2):
                start = time.perf_counter()
                report = job(str(root / f"{name}{workers}.zarr"), workers)
                rates[workers] = report.done / (time.perf_counter() - start)
            print(
                f"{name:9s} 1 worker {rates[1]:6.1f} tiles/s   2 workers {rates[2]:6.1f} "
                f"tiles/s   ratio {rates[2] / rates[1]:.2f}x"
            )


if __name__ == "__main__":
    main()
