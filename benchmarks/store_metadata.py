"""Bookkeeping cost against store size: open and flush on metadata-only stores.

Creates metadata-only stores (pixel arrays declared, no pixel chunk written) of ``--small``
(131072: two 65536-sample metadata chunks, so both sizes flush full chunks) and ``--samples``
(6.1 M, the paper's tile count) samples with ``--skip-share`` of the samples
carrying a skip reason, and measures side by side, medians of ``--repeat`` runs:

- open: :func:`store.format.open_store` plus reading the root attributes;
- flush: the driver's :func:`prep.driver.flush_records` of one 16-sample shard (metadata, cleared
  skip reasons, ``written`` last) plus one skip reason;

and, for comparison, the format-1 layout this replaced: the same skip reasons as a JSON map in
the root attribute ``skipped``, parsed on every open and rewritten on every flush. Prints the
ratios large/small (goal: ~1, cost independent of store size) and old/new at the large size.
Usage: ``python benchmarks/store_metadata.py [--samples 6100000]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from terrafm_lightning.prep.driver import flush_records  # noqa: E402
from terrafm_lightning.prep.sources.synthetic import synthetic_scene  # noqa: E402
from terrafm_lightning.store.format import create_store, open_store  # noqa: E402
from terrafm_lightning.store.records import sample_record  # noqa: E402
from terrafm_lightning.store.schema import SKIP_REASON  # noqa: E402

REASON = "sample {i}: InputError: cannot read /data/Core-S2L2A/images/part_00{k}.parquet row 7"


def interleaved_medians(runs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds of each run, the runs alternating (a loaded machine hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def make(path: str, n: int, skip_share: float) -> dict[int, str]:
    """A metadata-only store of ``n`` samples with skip reasons on a share of them."""
    create_store(path, n, 534)
    skipped = np.arange(0, n, int(round(1 / skip_share)))
    reasons = {int(i): REASON.format(i=i, k=i % 10) for i in skipped}
    root = open_store(path, mode="r+")
    root[SKIP_REASON].set_orthogonal_selection((skipped,), np.array(list(reasons.values())))
    return reasons


def runs(path: str, n: int, reasons: dict[int, str]) -> dict[str, Callable[[], object]]:
    """The timed operations on the store at ``path``: format 2, and format 1 for comparison."""
    root = open_store(path, mode="r+")
    attrs = root.attrs.asdict()
    base = (n // 2) // 16 * 16
    records = {base + k: sample_record(attrs, synthetic_scene(0, base + k, 16)) for k in range(16)}
    # Format 1: the same reasons as one JSON root attribute (written to a plain group).
    old = zarr.open_group(path + ".v1", mode="w", zarr_format=3)
    old.attrs["skipped"] = {str(k): v for k, v in reasons.items()}

    def old_flush() -> None:
        skipped = dict(old.attrs["skipped"])
        skipped[str(base + 16)] = "sample: bad"
        old.attrs["skipped"] = skipped

    return {
        "open": lambda: open_store(path).attrs.asdict(),
        "flush": lambda: flush_records(root, records, {base + 16: "sample: bad"}),
        "old_open": lambda: zarr.open_group(path + ".v1", mode="r").attrs.asdict(),
        "old_flush": old_flush,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=6_100_000, help="large store size")
    parser.add_argument(
        "--small", type=int, default=131_072, help="small store size (>= 2 metadata chunks)"
    )
    parser.add_argument("--skip-share", type=float, default=0.1, help="share with a skip reason")
    parser.add_argument("--repeat", type=int, default=7, help="runs per median")
    args = parser.parse_args()
    timed: dict[str, Callable[[], object]] = {}
    sizes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.samples):
            path = str(Path(tmp) / f"m{n}.zarr")
            start = time.perf_counter()
            reasons = make(path, n, args.skip_share)
            print(f"{n} samples: created in {time.perf_counter() - start:.1f} s")
            timed |= {f"{n}/{k}": run for k, run in runs(path, n, reasons).items()}
            sizes[f"{n}/attr_mb"] = len(json.dumps(reasons)) / 1e6
        medians = interleaved_medians(timed, args.repeat)
    small = {k.split("/")[1]: v for k, v in medians.items() if k.startswith(f"{args.small}/")}
    large = {k.split("/")[1]: v for k, v in medians.items() if k.startswith(f"{args.samples}/")}
    large["attr_mb"] = sizes[f"{args.samples}/attr_mb"]
    print(f"{'':24s} {args.small:>10d} {args.samples:>10d}   large/small")
    for key, label in (("open", "open (format 2)"), ("flush", "flush 16 (format 2)")):
        a, b = small[key], large[key]
        print(f"{label:24s} {a * 1e3:8.1f}ms {b * 1e3:8.1f}ms   {b / a:6.2f}x")
    for key, label in (
        ("old_open", "open (format 1 attr)"),
        ("old_flush", "flush (format 1 attr)"),
    ):
        a, b = small[key], large[key]
        print(f"{label:24s} {a * 1e3:8.1f}ms {b * 1e3:8.1f}ms   {b / a:6.2f}x")
    print(
        f"at {args.samples} samples ({large['attr_mb']:.0f} MB skipped attribute in format 1): "
        f"open {large['old_open'] / large['open']:.0f}x and flush "
        f"{large['old_flush'] / large['flush']:.0f}x faster in format 2"
    )


if __name__ == "__main__":
    main()
