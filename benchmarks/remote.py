"""majortom-remote vs majortom: throughput per worker and bytes fetched per product.

Inputs (written once to a temporary folder): the real-sample Major-TOM fixture
(tests/generators/majortom_real.py) at the real cell size, 1068 px (the five real 224 px
locations mirrored out), ``--copies`` times over (5 x copies cells, 4 tiles of 534 px each, 3
products per image parquet part), band GeoTIFFs ``--compress``-ed.

Throughput: ``terrafm-data majortom`` on the folders (local path) and
``terrafm-data majortom-remote`` on the same files through the loopback HTTP server (its own
process, so it takes no CPU time from the measured worker), both in process (``--scheduler
sync``: one worker), interleaved ``--repeat`` times after one warm-up run each (GDAL / PROJ /
codec set-up); decode and footer caches are cleared before each run. Goal: remote >= 0.8 x local.

Bytes: one more remote run against an in-thread server that counts every byte it serves for the
image parquets (footers included), against (a) the compressed size of the products' whole row
groups and (b) of the columns the reader needs (bands, product_id, grid_cell). Goal: <= 1.1 x (a).

Usage: ``PYTHONPATH=src:. python benchmarks/remote.py [--copies 1] [--repeat 2]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

from terrafm_lightning.prep import fetch
from terrafm_lightning.prep.sources import majortom
from terrafm_lightning.prep.sources.majortom_remote import Selection, prepare_majortom_remote
from terrafm_lightning.store.schema import Encoding
from tests.generators.http_server import serve
from tests.generators.majortom_real import DATASETS, write_real_fixture

TILE, CELL = 534, 1068
MODALITIES = ["s1", "s2_l1c", "s2_l2a"]
OPTIONS = {"scheduler": "sync", "progress": False, "encoding": Encoding(samples_per_shard=4)}


def _serve_forever(root: Path, urls: multiprocessing.Queue) -> None:
    with serve(root) as srv:
        urls.put(srv.url)
        threading.Event().wait()


def run_local(root: Path, out: str) -> float:
    majortom.decode_cell.cache_clear()
    start = time.perf_counter()
    roots = {m: str(root / DATASETS[m]) for m in MODALITIES}
    majortom.prepare_majortom(roots, out, TILE, CELL, **OPTIONS)
    return time.perf_counter() - start


def run_remote(url: str, out: str) -> float:
    majortom.decode_cell.cache_clear()
    fetch.remote_footer.cache_clear()
    start = time.perf_counter()
    prepare_majortom_remote(url, MODALITIES, out, Selection(), TILE, CELL, **OPTIONS)
    return time.perf_counter() - start


def compressed_sizes(root: Path) -> tuple[int, int]:
    """(whole row groups, needed columns) compressed bytes over every image parquet."""
    whole = needed = 0
    for m in MODALITIES:
        columns = set(majortom.row_columns(m))
        for part in sorted((root / DATASETS[m] / "images").glob("*.parquet")):
            meta = pq.read_metadata(part)
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for k in range(rg.num_columns):
                    size = rg.column(k).total_compressed_size
                    whole += size
                    needed += size if rg.column(k).path_in_schema in columns else 0
    return whole, needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=1, help="fixture copies (5 cells each)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per path")
    parser.add_argument("--compress", default="deflate", help="band GeoTIFF compression")
    parser.add_argument(
        "--samples",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared/data/terramind_examples",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mt"
        write_real_fixture(args.samples, root, args.compress, CELL, args.copies)
        cells = 5 * args.copies
        tiles = 4 * cells
        urls: multiprocessing.Queue = multiprocessing.get_context("fork").Queue()
        server = multiprocessing.get_context("fork").Process(
            target=_serve_forever, args=(root, urls), daemon=True
        )
        server.start()
        url = urls.get(timeout=30)
        try:
            run_local(root, f"{tmp}/warm-local.zarr")
            run_remote(url, f"{tmp}/warm-remote.zarr")
            local, remote = [], []
            for k in range(args.repeat):
                local.append(run_local(root, f"{tmp}/local{k}.zarr"))
                remote.append(run_remote(url, f"{tmp}/remote{k}.zarr"))
        finally:
            server.terminate()
        fetch.remote_footer.cache_clear()
        with serve(root) as counting:
            prepare_majortom_remote(
                counting.url, MODALITIES, f"{tmp}/bytes.zarr", Selection(), TILE, CELL, **OPTIONS
            )
            served = counting.bytes_sent("/Core-")
            metadata = sum(
                s.sent for s in counting.requests() if s.path.endswith("metadata.parquet")
            )
        whole, needed = compressed_sizes(root)
    image_bytes = served - metadata
    lt, rt = statistics.median(local), statistics.median(remote)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(f"fixture: {cells} cells of {CELL} px ({tiles} tiles of {TILE} px), {args.compress}")
    print(f"local  (majortom, folders):        {tiles / lt:6.2f} tiles/s  runs {local}")
    print(f"remote (majortom-remote, HTTP):    {tiles / rt:6.2f} tiles/s  runs {remote}")
    print(f"remote / local throughput per worker: {lt / rt:.3f} (goal >= 0.8)")
    print(
        f"bytes fetched for images: {image_bytes} = {image_bytes / whole:.3f} x the products' "
        f"compressed row groups ({whole}; goal <= 1.1), {image_bytes / needed:.3f} x the "
        f"columns read ({needed}); metadata parquets {metadata} bytes"
    )
    print(f"per product: {image_bytes / (3 * cells) / 1e6:.2f} MB fetched")


if __name__ == "__main__":
    main()
