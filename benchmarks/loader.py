"""Loader throughput per worker: batch reader vs raw decode vs the DataLoader path, and codec cost.

Writes a synthetic store of ``--samples`` three-modality tiles (``--size`` px, default 534, chunk
codec ``--codec``) and the same pixels as per-band GeoTIFFs (deflate, one file per band and
tile, as SSL4EO/BigEarthNet ship them), then reads every tile once per pass in one random order,
files in the page cache. Passes of all readers are interleaved (``--repeats`` rounds) so load
from other processes hits them alike; the table shows per-reader medians and the ratios are
medians of the per-round ratios:

- ``reader``: :meth:`StoreTileDataset.__getitems__` in batches of ``--batch`` in this process
  with one torch thread (concurrent chunk reads, decode into the batch buffers, nodata
  handling: exactly what a worker does),
- ``reader, no chunk checksums``: the same reader on the same pixels written without the crc32c
  codec in the chunk chain (as stores were before chunk checksums): the checksum's cost is the
  ratio of the two readers' CPU rates (goal: <= 3% of the reader's CPU time),
- ``reader via DataLoader``: the same batches through a persistent 1-worker spawn DataLoader
  (shared-memory batch buffers, identity collate); CPU time counts the worker and this process,
- ``raw decode``: the lower bound for the same bytes: per modality, the shard index and the
  tile's chunk read from the shard file and decoded by numcodecs into a new array (blosc is
  single-threaded like in zarr: importing zarr sets ``numcodecs.blosc.use_threads = False``);
  no nodata handling, no tensors,
- ``zarr indexing``: ``array[i]`` per modality (what the reader did before),
- ``GeoTIFF``: the same pixels from 26 per-band GeoTIFFs per tile with rasterio.

Wall rates include waiting for the shared CPU; CPU rates count CPU time (all threads), the better
measure of what a worker per core sustains on a loaded machine.
Goals: chunk checksums <= 3% of the reader's CPU, DataLoader >= 0.90 of the in-process reader,
reader >= 0.85 of raw decode (CPU time), reader >= 2x GeoTIFF.

With ``--real`` (default: ``$TERRAFM_SHARED/data/terramind_examples``), the real TerraMind
samples are also prepared into one store per codec and the compressed size of each modality is
printed: the compression-ratio cost of the GPU-decodable ``zstd`` codec against ``blosc``.
Usage: ``python benchmarks/loader.py [--samples 32] [--size 534] [--repeats 5] [--codec blosc]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numcodecs
import numpy as np
import psutil
import rasterio
import rasterio.errors
import torch
from torch.utils.data import DataLoader

from terrafm_lightning.data.dataset import StoreTileDataset, collate_tile_batch
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.prep.sources.geotiff import prepare_geotiff
from terrafm_lightning.prep.sources.synthetic import prepare_synthetic
from terrafm_lightning.store.codecs import CODECS
from terrafm_lightning.store.format import open_store
from terrafm_lightning.store.schema import NODATA, PIXEL_DTYPES, Encoding
from terrafm_lightning.store.sharding import EMPTY_CHUNK, chunk_layout

Reader = Callable[[np.ndarray], object]


def make_dataset(path: str) -> StoreTileDataset:
    return StoreTileDataset.from_store(path, nodata_threshold=1.0)


def batched(dataset: StoreTileDataset, batch: int) -> Reader:
    def read(order: np.ndarray) -> None:
        for start in range(0, len(order), batch):
            dataset.__getitems__(order[start : start + batch].tolist())

    return read


def raw_reader(path: Path, size: int, codec: str) -> Reader:
    """Read each tile's inner chunks from the shard files and decode them with numcodecs.

    The chunk's crc32c (its last 4 bytes) is left out, not checked: the lower bound.
    """
    layout = chunk_layout(open_store(str(path))["s1"])
    per_shard, index_bytes = layout.samples_per_shard, layout.index_nbytes
    trailer = 4 * layout.chunk_checksum
    decompress = numcodecs.blosc.decompress if codec == "blosc" else numcodecs.zstd.decompress

    def tile(i: int) -> list[np.ndarray]:
        out = []
        for m in MODALITIES:
            with open(path / m / "c" / str(i // per_shard) / "0" / "0" / "0", "rb") as f:
                f.seek(-index_bytes, 2)
                index = np.frombuffer(f.read(index_bytes)[:-4], "<u8").reshape(-1, 2)
                offset, nbytes = (int(v) for v in index[i % per_shard])
                shape = (len(BANDS[m]), size, size)
                if offset == EMPTY_CHUNK:  # chunk never written: all fill value
                    out.append(np.full(shape, NODATA[m], PIXEL_DTYPES[m]))
                    continue
                f.seek(offset)
                chunk = decompress(f.read(nbytes)[: nbytes - trailer])
            out.append(np.frombuffer(chunk, PIXEL_DTYPES[m]).reshape(shape))
        return out

    return lambda order: [tile(int(i)) for i in order]


def zarr_reader(path: Path) -> Reader:
    root = open_store(str(path))
    arrays = [root[m] for m in MODALITIES]
    return lambda order: [[a[int(i)] for a in arrays] for i in order]


def write_geotiffs(store: Path, n: int, root: Path) -> None:
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    arrays = open_store(str(store))
    for i in range(n):
        for m in MODALITIES:
            pixels = arrays[m][i]
            for b, band in enumerate(BANDS[m]):
                profile = {
                    "driver": "GTiff",
                    "width": pixels.shape[2],
                    "height": pixels.shape[1],
                    "count": 1,
                    "dtype": pixels.dtype.name,
                    "compress": "deflate",
                }
                with rasterio.open(root / f"{i}_{m}_{band}.tif", "w", **profile) as dst:
                    dst.write(pixels[b], 1)


def geotiff_reader(root: Path) -> Reader:
    def tile(i: int) -> list[np.ndarray]:
        out = []
        for m in MODALITIES:
            bands = []
            for band in BANDS[m]:
                with rasterio.open(root / f"{i}_{m}_{band}.tif") as src:
                    bands.append(src.read(1))
            out.append(np.stack(bands))
        return out

    return lambda order: [tile(int(i)) for i in order]


class LoaderReader:
    """A persistent 1-worker spawn DataLoader over fixed batches; CPU time includes the worker."""

    def __init__(self, dataset: StoreTileDataset, order: np.ndarray, batch: int) -> None:
        batches = [order[s : s + batch].tolist() for s in range(0, len(order), batch)]
        self.loader = DataLoader(
            dataset,
            batch_sampler=batches,
            collate_fn=collate_tile_batch,
            num_workers=1,
            multiprocessing_context="spawn",
            persistent_workers=True,
            prefetch_factor=2,
        )
        self.worker: psutil.Process | None = None

    def __call__(self, order: np.ndarray) -> None:
        iterator = iter(self.loader)
        if self.worker is None:
            self.worker = psutil.Process(iterator._workers[0].pid)
        for _ in iterator:
            pass

    def worker_cpu(self) -> float:
        if self.worker is None:
            return 0.0
        times = self.worker.cpu_times()
        return times.user + times.system


def rates(readers: dict[str, Reader], order: np.ndarray, repeats: int) -> dict[str, np.ndarray]:
    """Per reader, (repeats, 2) tiles/s by wall clock and CPU time; passes interleaved."""
    for read in readers.values():
        read(order[: min(8, len(order))])  # warm caches, start workers
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            extra = read.worker_cpu if isinstance(read, LoaderReader) else lambda: 0.0
            wall, cpu, other = time.perf_counter(), time.process_time(), extra()
            read(order)
            cpu_s = time.process_time() - cpu + extra() - other
            tiles = len(order)
            out[name].append((tiles / (time.perf_counter() - wall), tiles / cpu_s))
    return {name: np.array(values) for name, values in out.items()}


def throughput(args: argparse.Namespace, tmp: Path) -> None:
    # One intra-op thread, as in every DataLoader worker (idle OpenMP threads would spin and
    # bill CPU time to the in-process reader that a worker never pays).
    torch.set_num_threads(1)
    store, unchecked = tmp / "store.zarr", tmp / "unchecked.zarr"
    for path, checksum in ((store, True), (unchecked, False)):
        encoding = Encoding(codec=args.codec, chunk_checksum=checksum)
        prepare_synthetic(
            str(path), args.samples, args.size, encoding=encoding, scheduler="sync", progress=False
        )
    dataset = make_dataset(str(store))
    tiffs = tmp / "tiffs"
    tiffs.mkdir()
    write_geotiffs(store, args.samples, tiffs)
    order = np.random.default_rng(0).permutation(args.samples)
    names = {
        "reader": f"reader (batches of {args.batch})",
        "unchecked": "reader, no chunk checksums",
        "loader": "reader via 1-worker DataLoader",
        "raw": f"raw read + {args.codec} decode",
        "zarr": "zarr Array indexing",
        "geotiff": "per-band GeoTIFF (rasterio)",
    }
    measured = rates(
        {
            names["reader"]: batched(dataset, args.batch),
            names["unchecked"]: batched(make_dataset(str(unchecked)), args.batch),
            names["loader"]: LoaderReader(dataset, order, args.batch),
            names["raw"]: raw_reader(store, args.size, args.codec),
            names["zarr"]: zarr_reader(store),
            names["geotiff"]: geotiff_reader(tiffs),
        },
        order,
        args.repeats,
    )
    print(f"{args.samples} tiles of {args.size} px, S1 + S2 L1C + S2 L2A, codec {args.codec}")
    print(f"medians of {args.repeats} interleaved passes, {os.cpu_count()} CPUs")
    print(f"{'':36s} {'wall tiles/s':>12s} {'CPU tiles/s':>12s}")
    for name, values in measured.items():
        wall, cpu = np.median(values, axis=0)
        print(f"{name:36s} {wall:12.1f} {cpu:12.1f}")
    reader = measured[names["reader"]]

    def ratio(name: str, column: int) -> float:
        return float(np.median(measured[name][:, column] / reader[:, column]))

    print(
        f"chunk checksum cost, reader CPU time with / without: {ratio(names['unchecked'], 1):5.3f}"
        " (goal <= 1.03)"
    )
    print(
        f"DataLoader / in-process reader, wall: {ratio(names['loader'], 0):5.2f} (goal >= 0.90)"
        f"; CPU: {ratio(names['loader'], 1):5.2f}"
    )
    print(
        f"reader / raw decode, CPU: {1 / ratio(names['raw'], 1):5.2f} (goal >= 0.85)"
        f"; wall: {1 / ratio(names['raw'], 0):5.2f}"
    )
    print(f"reader / GeoTIFF, CPU: {1 / ratio(names['geotiff'], 1):5.2f}x (goal >= 2x)")
    print(f"reader / zarr indexing, CPU: {1 / ratio(names['zarr'], 1):5.2f}x")


def codec_cost(real: Path, tmp: Path) -> None:
    """Compressed bytes per modality of the real samples, one store per codec."""
    if not real.is_dir():
        print(f"real samples not found at {real}: codec cost skipped (pass --real)")
        return
    sizes: dict[str, dict[str, int]] = {}
    for codec in CODECS:
        path = tmp / f"real_{codec}.zarr"
        prepare_geotiff(
            str(real), str(path), encoding=Encoding(codec=codec), scheduler="sync", progress=False
        )
        sizes[codec] = {
            m: sum(f.stat().st_size for f in (path / m / "c").rglob("*") if f.is_file())
            for m in MODALITIES
        }
    root = open_store(str(tmp / "real_blosc.zarr"))
    print(f"\nreal samples {real} ({root['s1'].shape[0]} tiles of {root.attrs['tile_size']} px)")
    print(f"{'':8s} {'raw MB':>8s} " + " ".join(f"{c + ' ratio':>12s}" for c in CODECS))
    for m in MODALITIES:
        raw = root[m].nbytes
        ratios = " ".join(f"{raw / sizes[c][m]:12.2f}" for c in CODECS)
        print(f"{m:8s} {raw / 1e6:8.1f} {ratios}")
    total = {c: sum(sizes[c].values()) for c in CODECS}
    print(f"zstd / blosc bytes: {total['zstd'] / total['blosc']:.2f} (the GPU codec's size cost)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--size", type=int, default=534)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--codec", choices=CODECS, default="blosc")
    shared = Path(os.environ.get("TERRAFM_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--real", type=Path, default=shared / "data" / "terramind_examples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        throughput(args, Path(tmp))
        codec_cost(args.real, Path(tmp))


if __name__ == "__main__":
    main()
