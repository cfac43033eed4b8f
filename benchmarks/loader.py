"""Loader throughput per worker process: store reader vs raw decode vs per-band GeoTIFFs.

Writes a synthetic store of ``--samples`` three-modality tiles (``--size`` px, default 534) and
the same pixels as per-band GeoTIFFs (deflate, one file per band and tile, as SSL4EO/BigEarthNet
ship them), then reads every tile once per pass in one random order, single process (what
one DataLoader worker does), files in the page cache. Passes of the three readers are
interleaved (``--repeats`` rounds) so load from other processes hits all of them alike; the
table shows per-reader medians and the ratios are medians of the per-round ratios:

- ``loader``: :class:`StoreTileDataset` items (zarr read and decode of the three modalities,
  nodata handling, tensors in the store dtype: exactly what a worker hands to collate),
- ``loader via DataLoader``: the same through a 1-worker spawn DataLoader (collate + IPC),
- ``raw decode``: the lower bound for the same bytes: per modality, the shard index and the
  tile's chunk read from the shard file, blosc-decoded (same codec, and single-threaded like
  zarr's decode: importing zarr sets ``numcodecs.blosc.use_threads = False``) into a numpy view;
  no nodata handling, no tensors,
- ``GeoTIFF``: the same pixels from 26 per-band GeoTIFFs per tile with rasterio.

Wall rates include waiting for the shared CPU; CPU rates count this process's CPU time (all
threads), the better measure of what a worker per core sustains on a loaded machine.
Goals: loader >= 2x GeoTIFF and >= 70% of raw decode.
Usage: ``python benchmarks/loader.py [--samples 32] [--size 534] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numcodecs.blosc
import numpy as np
import rasterio
import rasterio.errors
from torch.utils.data import DataLoader

from terrafm_lightning.data.reader import SampleMetadata, StoreTileDataset
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.prep.sources.synthetic import prepare_synthetic
from terrafm_lightning.store.format import open_store
from terrafm_lightning.store.schema import NODATA, PIXEL_DTYPES

EMPTY = 2**64 - 1
"""Shard-index offset of an inner chunk that was never written."""


def make_dataset(path: str) -> StoreTileDataset:
    meta = SampleMetadata(open_store(path))
    samples = np.arange(len(meta.written))
    return StoreTileDataset(
        path, samples, meta.available, meta.worldcover_hist, meta.dominant_class, MODALITIES, 1.0
    )


def raw_reader(path: Path, size: int) -> Callable[[int], list[np.ndarray]]:
    """Read a sample's inner chunks from the shard files and blosc-decode them."""
    per_shard = int(open_store(str(path)).attrs["samples_per_shard"])
    index_bytes = per_shard * 16 + 4  # (offset, nbytes) uint64 per inner chunk + crc32c

    def read(i: int) -> list[np.ndarray]:
        out = []
        for m in MODALITIES:
            with open(path / m / "c" / str(i // per_shard) / "0" / "0" / "0", "rb") as f:
                f.seek(-index_bytes, 2)
                index = np.frombuffer(f.read(index_bytes)[:-4], "<u8").reshape(-1, 2)
                offset, nbytes = (int(v) for v in index[i % per_shard])
                shape = (len(BANDS[m]), size, size)
                if offset == EMPTY:  # chunk never written: all fill value (modality absent)
                    out.append(np.full(shape, NODATA[m], PIXEL_DTYPES[m]))
                    continue
                f.seek(offset)
                chunk = numcodecs.blosc.decompress(f.read(nbytes))
            out.append(np.frombuffer(chunk, PIXEL_DTYPES[m]).reshape(shape))
        return out

    return read


def write_geotiffs(dataset: StoreTileDataset, root: Path) -> None:
    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
    arrays = open_store(dataset.path)
    for i in range(len(dataset)):
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


def geotiff_reader(root: Path) -> Callable[[int], list[np.ndarray]]:
    def read(i: int) -> list[np.ndarray]:
        out = []
        for m in MODALITIES:
            bands = []
            for band in BANDS[m]:
                with rasterio.open(root / f"{i}_{m}_{band}.tif") as src:
                    bands.append(src.read(1))
            out.append(np.stack(bands))
        return out

    return read


def rates(
    readers: dict[str, Callable[[int], object]], order: np.ndarray, repeats: int
) -> dict[str, np.ndarray]:
    """Per reader, (repeats, 2) tiles/s by wall clock and process CPU time; passes interleaved."""
    for read in readers.values():
        for i in order[: min(4, len(order))]:
            read(int(i))  # warm caches
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in readers}
    for _ in range(repeats):
        for name, read in readers.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for i in order:
                read(int(i))
            tiles = len(order)
            out[name].append(
                (tiles / (time.perf_counter() - wall), tiles / (time.process_time() - cpu))
            )
    return {name: np.array(values) for name, values in out.items()}


def dataloader_rate(dataset: StoreTileDataset, order: np.ndarray, repeats: int) -> float:
    loader = DataLoader(
        dataset,
        batch_size=4,
        sampler=list(order) * repeats,
        num_workers=1,
        multiprocessing_context="spawn",
        prefetch_factor=4,
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["index"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--size", type=int, default=534)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.zarr"
        prepare_synthetic(str(store), args.samples, args.size, scheduler="sync", progress=False)
        dataset = make_dataset(str(store))
        tiffs = Path(tmp) / "tiffs"
        tiffs.mkdir()
        write_geotiffs(dataset, tiffs)
        order = np.random.default_rng(0).permutation(args.samples)
        measured = rates(
            {
                "loader (StoreTileDataset)": dataset.__getitem__,
                "raw read + blosc decode": raw_reader(store, args.size),
                "per-band GeoTIFF (rasterio)": geotiff_reader(tiffs),
            },
            order,
            args.repeats,
        )
        via_loader = dataloader_rate(dataset, order, args.repeats)
    print(f"{args.samples} tiles of {args.size} px, S1 + S2 L1C + S2 L2A, one process")
    print(f"medians of {args.repeats} interleaved passes")
    print(f"{'':32s} {'wall tiles/s':>12s} {'CPU tiles/s':>12s}")
    for name, values in measured.items():
        wall, cpu = np.median(values, axis=0)
        print(f"{name:32s} {wall:12.1f} {cpu:12.1f}")
    print(f"{'loader via 1-worker DataLoader':32s} {via_loader:12.1f}")
    loader = measured["loader (StoreTileDataset)"]
    geotiff = np.median(loader / measured["per-band GeoTIFF (rasterio)"], axis=0)
    raw = np.median(loader / measured["raw read + blosc decode"], axis=0)
    for k, clock in enumerate(("wall", "CPU")):
        print(
            f"{clock:4s}: loader / GeoTIFF {geotiff[k]:5.2f}x (goal >= 2x), "
            f"loader / raw decode {raw[k]:5.2f} (goal >= 0.70)"
        )


if __name__ == "__main__":
    main()
