"""``make eval``: the paper's evaluation tables on whichever benchmarks are found under a folder.

Every folder under ``--data`` is offered to the datamodules of
:data:`~terrafm_lightning.eval.protocols.BENCHMARKS` (their ``detect``); each dataset found runs
the protocols that table lists for its task type, with the given backbone (a pretraining
checkpoint's teacher, or released weights) and with a randomly initialised backbone of the same
architecture (the baseline, drawn once with seed 0), on the test split. ``--seeds N`` repeats
the seeded protocols and reports mean +- std. The paper's TerraFM-B column comes from
``paper_results.json`` (its source inside).

Frozen features are extracted once per backbone, dataset and split and cached under
``<out>/features``, keyed by what made them (:func:`~terrafm_lightning.eval.features.cache_key`):
another checkpoint, architecture, dataset or preprocessing never reuses them.

The table says what it could not do: a benchmark folder that cannot be evaluated (no split
files, no ``default_partition.json``, an unknown task, ...) is listed with the reason, and a
dataset whose splits share samples or whose test split is tiny is flagged in its rows and
printed as a warning. Outputs: ``results.json``, ``results.md`` and ``results.png`` in
``--out``. Mistakes in the arguments are one line (``--debug`` shows the traceback).

Usage::

    python -m terrafm_lightning.eval.report --ckpt last.ckpt --data /data/bench --out eval/
    python -m terrafm_lightning.eval.report --released TerraFM-B.pth --data /data/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any, NoReturn

import timm
import torch
from lightning import seed_everything
from torch import nn
from tqdm.auto import tqdm

from terrafm_lightning.errors import UserError
from terrafm_lightning.eval.datasets import EvalDataModule
from terrafm_lightning.eval.datasets.base import SPLITS, Detection
from terrafm_lightning.eval.features import (
    FeatureCache,
    SplitFeatures,
    cache_key,
    split_features,
    weights_digest,
)
from terrafm_lightning.eval.protocols import (
    BENCHMARKS,
    PROTOCOLS,
    Metrics,
    Run,
    Settings,
    protocols_of,
)
from terrafm_lightning.eval.render import markdown_table, plot_table
from terrafm_lightning.eval.task import BackboneTask
from terrafm_lightning.models.checkpoints import read_checkpoint
from terrafm_lightning.ssl.checkpoint import checkpoint_architecture

log = logging.getLogger(__name__)

MAKE_VARIABLES = {
    "ckpt": "CKPT",
    "released": "RELEASED",
    "backbone": "BACKBONE",
    "backbone_kwargs": "BACKBONE_KWARGS",
    "data": "DATA",
    "out": "EVAL_OUT",
    "epochs": "EVAL_EPOCHS",
    "probe_steps": "PROBE_STEPS",
    "finetune_epochs": "FINETUNE_EPOCHS",
    "upernet": "UPERNET",
    "seeds": "SEEDS",
    "batch_size": "EVAL_BATCH_SIZE",
    "num_workers": "EVAL_WORKERS",
    "split_seed": "SPLIT_SEED",
    "min_test_samples": "MIN_TEST_SAMPLES",
    "debug": "DEBUG",
}
"""Report option -> the Makefile variable that sets it (``make eval``); hints name both."""


class ReportError(Exception):
    """A mistake in the report's arguments, printed as one line."""


def _flag(option: str) -> str:
    return f"--{option.replace('_', '-')} ({MAKE_VARIABLES[option]}=)"


@dataclass(frozen=True)
class Found:
    """A dataset found under ``--data``: its folder, benchmark and detection."""

    name: str
    root: Path
    benchmark: str
    detection: Detection


def detect(folder: Path, name: str) -> list[Found]:
    """The datasets ``folder`` is, from the first benchmark whose datamodule recognises it."""
    for benchmark, spec in BENCHMARKS.items():
        detections = spec.datamodule.detect(folder)
        if detections:
            return [Found(name + d.suffix, folder, benchmark, d) for d in detections]
    return []


def find_datasets(data: Path, max_depth: int = 3) -> tuple[list[Found], list[Path]]:
    """Datasets under ``data`` (breadth-first, ``max_depth`` levels below it).

    Returns:
        The datasets, and the folders directly under ``data`` in which none was found.
    """
    found: list[Found] = []
    frontier = [data]
    for _ in range(max_depth + 1):
        deeper = []
        for folder in frontier:
            name = folder.relative_to(data).as_posix() if folder != data else data.name
            here = detect(folder, name)
            found += here
            if not here:
                deeper += sorted(sub for sub in folder.iterdir() if sub.is_dir())
        frontier = deeper
    if any(f.root == data for f in found):
        return found, []
    children = sorted(sub for sub in data.iterdir() if sub.is_dir())
    used = {p for f in found for p in (f.root, *f.root.parents)}
    return found, [c for c in children if c not in used]


def split_warnings(dm: EvalDataModule, min_test: int) -> list[str]:
    """Overlapping splits (by sample key) and a test split smaller than ``min_test``."""
    warnings = []
    ids = {
        s: {str(k) for k in dm.datasets[s].keys} for s in SPLITS if hasattr(dm.datasets[s], "keys")
    }
    for a, b in combinations(SPLITS, 2):
        if a in ids and b in ids and ids[a] & ids[b]:
            warnings.append(f"{len(ids[a] & ids[b])} samples in both {a} and {b}")
    n_test = len(dm.datasets["test"])
    if n_test < min_test:
        warnings.append(f"test split of {n_test} samples (< {min_test})")
    return warnings


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (0 for one value) and the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def paper_results() -> dict[str, Any]:
    """The paper's TerraFM-B numbers and their source (``paper_results.json``)."""
    text = resources.files("terrafm_lightning.eval").joinpath("paper_results.json").read_text()
    return json.loads(text)


@dataclass
class Source:
    """A backbone source: the :class:`BackboneTask` arguments and the backbone they built."""

    args: dict[str, Any]
    backbone: nn.Module
    weights: str


def backbone_sources(
    ckpt: Path | None,
    released: Path | None,
    backbone: str,
    backbone_kwargs: dict[str, Any],
    device: str,
) -> tuple[str, dict[str, Any], dict[str, Source]]:
    """Architecture (factory, kwargs) and the sources: the checkpoint or release, random init.

    Raises:
        ReportError: a missing, unreadable or non-fitting checkpoint / weights file.
    """
    if (ckpt is None) == (released is None):
        raise ReportError(f"give exactly one of {_flag('ckpt')} and {_flag('released')}")
    if ckpt is not None:
        try:
            name, kwargs = checkpoint_architecture(read_checkpoint(ckpt))
        except UserError as err:
            raise ReportError(f"{_flag('ckpt')}: {err}") from err
        kwargs.update(backbone_kwargs)
        args = {"checkpoint": {"checkpoint": str(ckpt), "backbone_kwargs": backbone_kwargs}}
    else:
        name, kwargs = backbone, dict(backbone_kwargs)
        released_args = {"backbone": name, "backbone_kwargs": kwargs}
        args = {"released": released_args | {"released_weights": str(released)}}
    args["random init"] = {"backbone": name, "backbone_kwargs": kwargs}
    if not timm.is_model(name):
        known = timm.list_models("terrafm_*")
        raise ReportError(f"{_flag('backbone')} {name}: unknown backbone; one of {known}")
    sources = {}
    for source, source_args in args.items():
        seed_everything(0, verbose=False)
        try:
            model = BackboneTask(**source_args).backbone.to(device)
        except UserError as err:
            reason = str(err).splitlines()[0].rstrip(":")
            if source == "released" and not isinstance(err, FileNotFoundError):
                reason += (
                    f" (asked: {name}{kwargs or ''}); give the {_flag('backbone')} of the file's "
                    "size"
                )
            option = "released" if source == "released" else "ckpt"
            raise ReportError(f"{_flag(option)}: {reason}") from err
        sources[source] = Source(source_args, model, weights_digest(model))
    return name, kwargs, sources


def _preprocessing(dm: EvalDataModule, found: Found) -> dict[str, Any]:
    return {
        "datamodule": type(dm).__name__,
        "detection": found.detection.kwargs,
        "modalities": dm.modalities,
        "img_size": dm.img_size,
        "missing_bands": dm.missing_bands,
        "stats": dm.stats,
        "split_seed": dm.split_seed,
    }


def evaluate_dataset(
    found: Found,
    dm: EvalDataModule,
    sources: dict[str, Source],
    architecture: dict[str, Any],
    settings: Settings,
    cache: FeatureCache,
) -> dict[str, dict[str, list[Metrics]]]:
    """Source -> protocol -> per-seed test metrics on one (set-up) datamodule."""
    preprocessing = _preprocessing(dm, found)
    protocols = protocols_of(BENCHMARKS[found.benchmark], dm.task, settings)
    results = {}
    for name, source in sources.items():

        @functools.cache
        def features(split: str, source: Source = source) -> SplitFeatures:
            dataset = dm.datasets[split]
            key = cache_key(source.weights, architecture, found.root, split, dataset, preprocessing)
            device = next(source.backbone.parameters()).device
            return split_features(
                source.backbone, dataset, settings.batch_size, device, cache, key,
                desc=f"{found.name} {split} features",
            )  # fmt: skip

        run = Run(dm, source.args, settings, features)
        results[name] = {p: PROTOCOLS[p].run(run) for p in protocols}
    return results


def run(
    data: Path,
    out: Path,
    ckpt: Path | None = None,
    released: Path | None = None,
    backbone: str = "terrafm_base",
    backbone_kwargs: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Evaluate the backbone and its random-init baseline on every dataset; write the tables.

    Raises:
        ReportError: a mistake in the arguments (folder, checkpoint, weights).
    """
    settings = settings or Settings()
    if not data.is_dir():
        raise ReportError(f"{_flag('data')}: folder not found: {data}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name, kwargs, sources = backbone_sources(
        ckpt, released, backbone, dict(backbone_kwargs or {}), device
    )
    found, unrecognised = find_datasets(data)
    if not found:
        raise ReportError(
            f"{data}: no benchmark found (looked for {', '.join(BENCHMARKS)} layouts; see "
            "docs/evaluation.md)"
        )
    cache = FeatureCache(out / "features")
    architecture = {"backbone": name, "backbone_kwargs": kwargs}
    paper = paper_results()
    rows: list[dict[str, Any]] = []
    not_evaluated = [
        {"dataset": f.name, "path": str(f.root), "benchmark": f.benchmark,
         "reason": f.detection.problem}
        for f in found
        if f.detection.problem
    ]  # fmt: skip
    for found_ in tqdm([f for f in found if not f.detection.problem], desc="make eval"):
        start = time.perf_counter()
        spec = BENCHMARKS[found_.benchmark]
        try:
            dm = spec.datamodule(
                found_.root, batch_size=settings.batch_size, num_workers=settings.num_workers,
                missing_bands="fill", split_seed=settings.split_seed, **found_.detection.kwargs,
            )  # fmt: skip
            dm.setup("fit")
        except (ValueError, FileNotFoundError) as err:
            log.warning("not evaluated: %s: %s", found_.root, err)
            not_evaluated.append(
                {"dataset": found_.name, "path": str(found_.root),
                 "benchmark": found_.benchmark, "reason": str(err)}
            )  # fmt: skip
            continue
        warnings = split_warnings(dm, settings.min_test_samples)
        for warning in warnings:
            log.warning("%s: %s: its numbers are not a benchmark result", found_.name, warning)
        results = evaluate_dataset(found_, dm, sources, architecture, settings, cache)
        samples = {s: len(d) for s, d in dm.datasets.items()}
        for protocol in results[next(iter(sources))]:
            for metric, suffix in [(dm.metric, ""), *spec.extra_metrics]:
                label = protocol + suffix
                rows.append(
                    {
                        "dataset": found_.name,
                        "benchmark": found_.benchmark,
                        "path": str(found_.root),
                        "datamodule": type(dm).__name__,
                        "modalities": dm.modalities,
                        "protocol": label,
                        "metric": metric,
                        "paper": paper["rows"].get(found_.detection.paper_key or "", {}).get(label),
                        "mean_filled_bands": dm.filled_bands,
                        "samples": samples,
                        "warnings": warnings,
                        "results": {
                            s: summarise([100 * r[metric] for r in results[s][protocol]])
                            for s in sources
                        },
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
    not_evaluated += [
        {"dataset": p.name, "path": str(p), "benchmark": "none",
         "reason": "no benchmark layout recognised in this folder"}
        for p in unrecognised
    ]  # fmt: skip
    report = {
        "backbone": name,
        "backbone_kwargs": kwargs,
        "sources": {s: src.args | {"weights_sha256": src.weights} for s, src in sources.items()},
        "settings": dataclasses.asdict(settings),
        "paper": {"model": paper["model"], "source": paper["source"]},
        "rows": rows,
        "not_evaluated": not_evaluated,
        "feature_cache": {"reused": cache.reused, "computed": cache.computed},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report))
    plot_table(report, out / "results.png")
    return report


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, naming the Makefile variable of each flag."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(
            r"--([a-z-]+)",
            lambda m: _flag(m[1].replace("-", "_")) if m[1].replace("-", "_") in MAKE_VARIABLES
            else m[0],
            message,
        )  # fmt: skip
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line: backbone source, folders, then every :class:`Settings` field."""
    parser = _Parser(
        prog="python -m terrafm_lightning.eval.report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="TerraFMPretrainModule checkpoint (teacher)")
    source.add_argument("--released", type=Path, help="released TerraFM-B/-L .pth weights")
    parser.add_argument("--backbone", default="terrafm_base", help="factory of --released")
    parser.add_argument(
        "--backbone-kwargs", type=json.loads, default={},
        help="JSON factory kwargs (with --ckpt: non-architectural overrides)",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, required=True, help="folder holding the datasets")
    parser.add_argument("--out", type=Path, default=Path("outputs/eval"), help="output folder")
    for option in dataclasses.fields(Settings):
        flag = f"--{option.name.replace('_', '-')}"
        if option.type == "bool":
            parser.add_argument(flag, action="store_true", help=option.metadata["help"])
        else:
            parser.add_argument(
                flag, type=int, default=option.default, help=option.metadata["help"]
            )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m terrafm_lightning.eval.report``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    try:
        run(
            args.data,
            args.out,
            ckpt=args.ckpt,
            released=args.released,
            backbone=args.backbone,
            backbone_kwargs=args.backbone_kwargs,
            settings=settings,
        )
    except ReportError as err:
        if args.debug:
            raise
        sys.exit(f"make eval: {err}")
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
