"""``terrafm-data``: build and check TerraFM Zarr stores (see ``terrafm-data <command> --help``).

Every error is one line naming the file, tile or store and the fix (exit 2; 1 for an unexpected
failure); ``--debug`` shows the traceback instead. Ctrl-C prints one line and exits 130; the
same command run again resumes where the run stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from terrafm_lightning.prep.driver import PrepReport
from terrafm_lightning.prep.errors import InputError, PrepError
from terrafm_lightning.prep.passes.stats import compute_stats
from terrafm_lightning.prep.passes.worldcover import prepare_worldcover
from terrafm_lightning.prep.sources.geotiff import DEFAULT_FOLDERS, prepare_geotiff
from terrafm_lightning.prep.sources.majortom import prepare_majortom
from terrafm_lightning.prep.sources.majortom_remote import (
    DATASETS,
    DEFAULT_BASE_URL,
    Selection,
    dry_run_lines,
    plan_remote,
    prepare_majortom_remote,
)
from terrafm_lightning.prep.sources.synthetic import GAIN_RANGE, S2_NOISE, prepare_synthetic
from terrafm_lightning.prep.units import UnitConversion
from terrafm_lightning.store.format import StoreError
from terrafm_lightning.store.schema import Encoding
from terrafm_lightning.store.validate import validate_store, validation_notes


def _option_groups() -> dict[str, argparse.ArgumentParser]:
    """Options shared by several subcommands, each defined once (argparse parent parsers)."""
    names = ("storage", "dask", "progress", "run", "write", "debug", "partial")
    groups = {k: argparse.ArgumentParser(add_help=False) for k in names}
    groups["debug"].add_argument(
        "--debug", action="store_true", help="show the traceback of an error (not one line)"
    )
    groups["partial"].add_argument(
        "--keep-partial",
        action="store_true",
        help="keep tiles where an input modality has no valid pixel (entirely nodata, or not "
        "overlapping the reference grid), that modality marked unavailable and the reason in "
        "skip_reason (default: such a tile is an error)",
    )
    groups["storage"].add_argument(
        "--storage-options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='fsspec options of the store as JSON, e.g. \'{"endpoint_url": "http://..."}\' (S3)',
    )
    p = groups["dask"]
    p.add_argument(
        "--scheduler",
        default="local",
        metavar="local|sync|ADDRESS",
        help="'local' (a dask LocalCluster, default), 'sync' (in process, no dask) or the "
        "address of a running dask scheduler (tcp://host:8786) to use many machines",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="LocalCluster worker processes (default: CPUs)"
    )
    groups["progress"].add_argument(
        "--no-progress", action="store_true", help="hide the progress bar"
    )
    p = groups["run"]
    p.add_argument(
        "--skip-bad", action="store_true", help="skip and count bad tiles instead of stopping"
    )
    p = groups["write"]
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing store at the output"
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=Encoding.samples_per_shard,
        help="samples per shard object of the pixel arrays (default: %(default)s)",
    )
    p.add_argument(
        "--codec",
        choices=["zstd", "lz4"],
        default=Encoding.cname,
        help="blosc compressor of the pixel arrays: zstd (smaller, default) or lz4 (faster decode)",
    )
    p.add_argument(
        "--gpu-codec",
        action="store_true",
        help="plain zstd chunks instead of blosc: decoded on the GPU by nvCOMP, ~1.4x larger",
    )
    return groups


def _encoding(args: argparse.Namespace) -> Encoding:
    codec = "zstd" if args.gpu_codec else "blosc"
    return Encoding(samples_per_shard=args.samples_per_shard, cname=args.codec, codec=codec)


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "scheduler": args.scheduler,
        "workers": args.workers,
        "skip_bad": args.skip_bad,
        "progress": not args.no_progress,
        "storage_options": args.storage_options,
    }


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="terrafm-data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    groups = _option_groups()
    run = [groups["storage"], groups["dask"], groups["progress"], groups["run"], groups["debug"]]
    prep = [*run, groups["write"]]
    sources = [*prep, groups["partial"]]
    output = "store path or URL to write (local path or fsspec URL such as s3://bucket/x.zarr)"
    tile_size = "tile height and width in pixels"

    p = sub.add_parser("synthetic", parents=prep, help="write a procedural synthetic store")
    p.add_argument("output", help=output)
    p.add_argument("--samples", type=int, default=256, help="number of tiles (default: 256)")
    p.add_argument("--tile-size", type=int, default=534, help=f"{tile_size} (default: 534)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (tile i is fixed by seed, i)")
    p.add_argument(
        "--gain-range",
        type=float,
        nargs=2,
        default=GAIN_RANGE,
        metavar=("LOW", "HIGH"),
        help="range of the per-tile S2 illumination gain (default: %(default)s)",
    )
    p.add_argument(
        "--s2-noise",
        type=float,
        default=S2_NOISE,
        help="relative per-pixel S2 noise std (more: harder land-cover task; default %(default)s)",
    )
    p.add_argument(
        "--nuisance",
        type=float,
        default=0.0,
        help="strength of per-sensor illumination / haze / S1 calibration nuisance that leaves "
        "the land cover unchanged (0: none; default %(default)s)",
    )

    p = sub.add_parser(
        "geotiff", parents=sources, help="folders of co-registered GeoTIFFs -> store"
    )
    p.add_argument("source", help="root with one sub-folder per modality")
    p.add_argument("output", help=output)
    p.add_argument("--tile-size", type=int, default=None, help=f"{tile_size} (default: raster)")
    for m, folder in DEFAULT_FOLDERS.items():
        p.add_argument(
            f"--{m.replace('_', '-')}-folder",
            default=folder,
            dest=f"folder_{m}",
            help=f"sub-folder of the {m} GeoTIFFs, or 'none' for no {m} (default: {folder})",
        )
    p.add_argument(
        "--match",
        default=None,
        metavar="REGEX",
        help="regular expression matched against each file name; its named groups, joined by "
        "'_', are the location key that pairs files (default: the file stem)",
    )
    p.add_argument("--allow-missing", action="store_true", help="keep locations lacking a modality")
    p.add_argument(
        "--s2-reflectance-scale",
        type=float,
        default=None,
        metavar="FACTOR",
        help="float S2 inputs are multiplied by FACTOR and rounded to DN: 10000 for reflectance "
        "0-1, 1 for float DN (default: float S2 is an error; integer S2 is DN as it is)",
    )
    p.add_argument(
        "--s1-linear-to-db",
        action="store_true",
        help="S1 inputs are linear power: store 10*log10 (default: S1 must be dB)",
    )

    p = sub.add_parser("majortom", parents=sources, help="Major-TOM Core parquet files -> store")
    p.add_argument("output", help=output)
    p.add_argument("--s1", help="Core-S1RTC folder (metadata.parquet + image parquets)")
    p.add_argument("--s2-l1c", help="Core-S2L1C folder")
    p.add_argument("--s2-l2a", help="Core-S2L2A folder")
    p.add_argument("--tile-size", type=int, default=534, help=f"{tile_size} (default: 534)")
    p.add_argument(
        "--cell-size", type=int, default=1068, help="grid cell size in pixels (default: 1068)"
    )
    p.add_argument("--allow-missing", action="store_true", help="keep cells lacking a modality")

    p = sub.add_parser(
        "majortom-remote",
        parents=sources,
        help="a Major-TOM Core subset read remotely (only the selected rows) -> store",
    )
    p.add_argument("output", help=output)
    p.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        help="folder or URL holding Core-S1RTC/, Core-S2L1C/, Core-S2L2A/ (a mirror, a local "
        "copy, s3://...); '{name}' stands for the dataset (default: Hugging Face, %(default)s)",
    )
    p.add_argument(
        "--modalities",
        nargs="+",
        choices=list(DATASETS),
        default=list(DATASETS),
        help="datasets joined by grid_cell (default: all three)",
    )
    p.add_argument(
        "--bbox",
        type=float,
        nargs=4,
        metavar=("WEST", "SOUTH", "EAST", "NORTH"),
        help="cell centres inside this box (degrees)",
    )
    p.add_argument("--grid-cells", nargs="+", metavar="CELL", help="these grid cells only")
    p.add_argument("--start", help="first acquisition time (ISO date or time, inclusive)")
    p.add_argument("--end", help="last acquisition time (ISO date or time, inclusive)")
    p.add_argument("--max-cloud", type=float, help="most S2 cloud_cover (percent)")
    p.add_argument("--max-nodata", type=float, help="most nodata share (0..1)")
    p.add_argument("--cells", type=int, help="keep the first N selected cells (sorted)")
    p.add_argument("--tile-size", type=int, default=534, help=f"{tile_size} (default: 534)")
    p.add_argument(
        "--cell-size", type=int, default=1068, help="grid cell size in pixels (default: 1068)"
    )
    p.add_argument("--allow-missing", action="store_true", help="keep cells lacking a modality")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the selection (products, cells, bytes to fetch) and fetch no images",
    )

    p = sub.add_parser(
        "worldcover",
        parents=run,
        help="WorldCover maps onto every tile of a store",
    )
    p.add_argument("store", help="existing store path or URL")
    p.add_argument("worldcover", nargs="+", help="WorldCover GeoTIFF/COG files or folders")
    p.add_argument(
        "--drop-water-above",
        type=float,
        default=None,
        metavar="SHARE",
        help="drop tiles whose water + open-ocean share exceeds SHARE (default: keep all)",
    )
    p.add_argument(
        "--keep-water-share",
        type=float,
        default=0.02,
        help="share of those mostly-water tiles kept anyway (default: 0.02, as the paper)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the kept water tiles")

    p = sub.add_parser(
        "stats",
        parents=[groups["storage"], groups["dask"], groups["progress"], groups["debug"]],
        help="exact per-band mean/std written into the store",
    )
    p.add_argument("store", help="store path or URL")

    p = sub.add_parser(
        "validate",
        parents=[groups["storage"], groups["debug"]],
        help="check a store against the format",
    )
    p.add_argument("store", help="store path or URL")
    p.add_argument("--deep-samples", type=int, default=16, help="samples checked pixel-wise")
    p.add_argument(
        "--deep",
        action="store_true",
        help="read every stored chunk, verify its checksum and decode it; list each damaged tile",
    )
    return parser


def run(args: argparse.Namespace) -> int:
    """Execute a parsed command; returns the exit status."""
    report: PrepReport | None = None
    if args.command == "synthetic":
        report = prepare_synthetic(
            args.output,
            args.samples,
            args.tile_size,
            args.seed,
            tuple(args.gain_range),
            args.s2_noise,
            args.nuisance,
            encoding=_encoding(args),
            overwrite=args.overwrite,
            **_run_options(args),
        )
    elif args.command == "geotiff":
        folders = {m: getattr(args, f"folder_{m}") for m in DEFAULT_FOLDERS}
        report = prepare_geotiff(
            args.source,
            args.output,
            args.tile_size,
            {m: None if f.lower() == "none" else f for m, f in folders.items()},
            not args.allow_missing,
            args.match,
            conversion=UnitConversion(args.s2_reflectance_scale, args.s1_linear_to_db),
            keep_partial=args.keep_partial,
            encoding=_encoding(args),
            overwrite=args.overwrite,
            **_run_options(args),
        )
    elif args.command == "majortom":
        roots = {
            m: v
            for m, v in (("s1", args.s1), ("s2_l1c", args.s2_l1c), ("s2_l2a", args.s2_l2a))
            if v
        }
        if not roots:
            raise InputError("give at least one of --s1, --s2-l1c, --s2-l2a")
        report = prepare_majortom(
            roots,
            args.output,
            args.tile_size,
            args.cell_size,
            not args.allow_missing,
            keep_partial=args.keep_partial,
            encoding=_encoding(args),
            overwrite=args.overwrite,
            **_run_options(args),
        )
    elif args.command == "majortom-remote":
        selection = Selection(
            tuple(args.bbox) if args.bbox else None,
            tuple(args.grid_cells) if args.grid_cells else None,
            args.start,
            args.end,
            args.max_cloud,
            args.max_nodata,
            args.cells,
        )
        if args.dry_run:
            cells, notes = plan_remote(
                args.base_url, args.modalities, selection, not args.allow_missing
            )
            for line in [*dry_run_lines(cells, (args.cell_size // args.tile_size) ** 2), *notes]:
                print(line)
            return 0
        report = prepare_majortom_remote(
            args.base_url,
            args.modalities,
            args.output,
            selection,
            args.tile_size,
            args.cell_size,
            not args.allow_missing,
            keep_partial=args.keep_partial,
            encoding=_encoding(args),
            overwrite=args.overwrite,
            **_run_options(args),
        )
    elif args.command == "worldcover":
        report = prepare_worldcover(
            args.store,
            args.worldcover,
            drop_water_above=args.drop_water_above,
            keep_water_share=args.keep_water_share,
            seed=args.seed,
            **_run_options(args),
        )
    elif args.command == "stats":
        stats = compute_stats(
            args.store, args.storage_options, args.scheduler, args.workers, not args.no_progress
        )
        for m, s in stats.items():
            print(f"{m}: mean {[round(v, 2) for v in s['mean']]}")
            print(f"{' ' * len(m)}  std  {[round(v, 2) for v in s['std']]}")
    else:
        problems = validate_store(args.store, args.deep_samples, args.storage_options, args.deep)
        for problem in problems:
            print(f"problem: {problem}")
        for note in validation_notes(args.store, args.storage_options):
            print(f"note: {note}")
        print(f"{args.store}: {'valid' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    if report is not None:
        print(report.summary())
        for reason in report.skipped.values():
            print(f"skipped {reason}")
        for note in report.notes:
            print(note)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: one line per error (exit 2, 1 if unexpected), Ctrl-C exit 130."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (Exception, KeyboardInterrupt) as err:
        if args.debug:
            raise
        return _report(args.command, err)


def _report(command: str, err: Exception | KeyboardInterrupt) -> int:
    """Print the one line for ``err`` and return the exit status."""
    if isinstance(err, KeyboardInterrupt):
        again = "" if command == "validate" else "; rerun the same command to resume"
        print(f"terrafm-data {command}: interrupted{again}", file=sys.stderr)
        return 130
    if isinstance(err, (InputError, PrepError, StoreError)):
        print(f"terrafm-data {command}: error: {err}", file=sys.stderr)
        return 2
    print(
        f"terrafm-data {command}: error: {type(err).__name__}: {err} "
        "(unexpected; --debug shows the traceback)",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
