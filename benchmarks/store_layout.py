"""Chunking / sharding / compression choice for the store, measured on real pixels.

Writes the real TerraMind example tiles (5 locations, S1 dB + S2 L1C + S2 L2A, 224 px; repeated
with flips to ``--samples`` tiles) with each candidate encoding, then reads whole three-modality
tiles in random order. Prints compression ratio, objects per tile and read+decode rate relative
to the default encoding. Usage: ``python benchmarks/store_layout.py [--samples 64]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import zarr
import zarr.codecs

from terrafm_lightning.modalities import S2_L1C_ALL_BANDS

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "terramind_examples"
FOLDERS = {"s1": "S1RTC", "s2_l1c": "S2L1C", "s2_l2a": "S2L2A"}


def real_tiles(n: int) -> dict[str, np.ndarray]:
    """(n, band, 224, 224) per modality in store dtypes, from the real examples."""
    keep = [i for i, b in enumerate(S2_L1C_ALL_BANDS) if b != "B10"]
    out: dict[str, list[np.ndarray]] = {m: [] for m in FOLDERS}
    files = sorted((SHARED / "S2L2A").glob("*.tif"))
    for k in range(n):
        stem = files[k % len(files)].name
        for m, folder in FOLDERS.items():
            with rasterio.open(SHARED / folder / stem) as src:
                a = src.read()
            a = a[keep] if m == "s2_l1c" else a
            a = a.astype(np.float32) if m == "s1" else a.clip(0).astype(np.uint16)
            out[m].append(np.rot90(a, k // len(files), axes=(1, 2)).copy())
    return {m: np.stack(v) for m, v in out.items()}


def measure(root: Path, name: str, tiles: dict, chunk_bands: bool, shard: int, codec) -> dict:
    n = len(tiles["s1"])
    path = root / f"{name}.zarr"
    g = zarr.open_group(path, mode="w")
    t0 = time.perf_counter()
    for m, a in tiles.items():
        c = a.shape[1] if chunk_bands else 1
        arr = g.create_array(
            m,
            shape=a.shape,
            dtype=a.dtype,
            chunks=(1, c, *a.shape[2:]),
            shards=(shard, a.shape[1], *a.shape[2:]) if shard > 1 else None,
            compressors=codec,
        )
        arr[:] = a
    write_s = time.perf_counter() - t0
    raw = sum(a.nbytes for a in tiles.values())
    files = [p for p in path.rglob("*") if p.is_file() and p.name != "zarr.json"]
    disk = sum(p.stat().st_size for p in files)
    g = zarr.open_group(path, mode="r")
    arrays = [g[m] for m in tiles]
    order = np.random.default_rng(0).permutation(n)
    t0 = time.perf_counter()
    for _ in range(3):
        for i in order:
            for arr in arrays:
                arr[int(i)]
    read_s = (time.perf_counter() - t0) / 3
    return {
        "ratio": raw / disk,
        "objects_per_tile": len(files) / n,
        "read_tiles_s": n / read_s,
        "write_tiles_s": n / write_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    tiles = real_tiles(args.samples)

    def blosc(cname: str, level: int, shuffle: str = "bitshuffle"):
        return zarr.codecs.BloscCodec(cname=cname, clevel=level, shuffle=shuffle)

    candidates = {
        "default: 1 tile x all bands, shard 16, blosc zstd1 bitshuffle": (
            True,
            16,
            blosc("zstd", 1),
        ),
        "blosc zstd3 bitshuffle": (True, 16, blosc("zstd", 3)),
        "blosc zstd5 bitshuffle": (True, 16, blosc("zstd", 5)),
        "blosc zstd1 byte shuffle": (True, 16, blosc("zstd", 1, "shuffle")),
        "blosc lz4 bitshuffle": (True, 16, blosc("lz4", 5)),
        "zstd1 (no blosc, no shuffle)": (True, 16, zarr.codecs.ZstdCodec(level=1)),
        "chunk per band, shard 16": (False, 16, blosc("zstd", 1)),
        "no sharding (1 object per tile)": (True, 1, blosc("zstd", 1)),
        "shard 64": (True, 64, blosc("zstd", 1)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            name: measure(Path(tmp), str(k), tiles, *spec)
            for k, (name, spec) in enumerate(candidates.items())
        }
    base = next(iter(results.values()))
    print(f"{args.samples} real 224 px tiles (S1 + S2 L1C + S2 L2A), random whole-tile reads")
    print(f"{'encoding':<64} ratio  obj/tile  read tiles/s (x default)  write tiles/s")
    for name, r in results.items():
        print(
            f"{name:<64} {r['ratio']:5.2f}  {r['objects_per_tile']:7.3f}  "
            f"{r['read_tiles_s']:8.0f} ({r['read_tiles_s'] / base['read_tiles_s']:.2f}x)"
            f"  {r['write_tiles_s']:8.0f}"
        )


if __name__ == "__main__":
    main()
