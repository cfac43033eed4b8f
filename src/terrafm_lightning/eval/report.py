"""``make eval``: the paper's evaluation tables on whichever benchmarks are found under a folder.

Every dataset found under ``--data`` (recognised by layout, see :func:`find_datasets`) is
evaluated with the given backbone (a pretraining checkpoint, teacher branch, or released
weights) and with a randomly initialised backbone of the same architecture (the baseline).
Protocols, on the test split, following the paper's tables (``reference/paper_results.md``):

- classification: ``kNN 100%`` (cosine, k = 20, exp(sim / 0.07)) and ``kNN 1%`` (a seeded 1%
  subset of the training bank, at least one sample, redrawn per seed), the ``frozen probe``
  (linear head on cached frozen CLS features), and for GEO-Bench, with ``--finetune-epochs``,
  ``fine-tune`` (:class:`FineTune`, layer decay 0.75);
- segmentation: ``linear seg`` (and ``UPerNet seg`` with ``--upernet``) on frozen patch tokens;
  Landslide4Sense also reports the landslide-class IoU.

Metric per task: top-1 (OA), micro-F1 for multilabel GEO-Bench / BigEarthNet (the paper's kNN
metric), mAP for Copernicus-Bench BigEarthNet, mIoU for segmentation. Frozen features are
extracted once per backbone, dataset and split and cached under ``<out>/features``; kNN and
probes run on them. ``--seeds N`` repeats the seeded protocols (1% subsets, probe
initialisation, probe training) and reports mean +- std; the random-init backbone is drawn once
(seed 0). The paper's TerraFM-B column comes from ``paper_results.json`` (its source inside).
Outputs: ``results.json``, ``results.md`` and ``results.png`` in ``--out``.

Usage::

    python -m terrafm_lightning.eval.report --ckpt last.ckpt --data /data/bench --out eval/
    python -m terrafm_lightning.eval.report --released TerraFM-B.pth --data /data/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import matplotlib
import rasterio
import torch
from lightning import Trainer, seed_everything
from torch import nn
from tqdm.auto import tqdm

from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    CopernicusBenchDataModule,
    EuroSATDataModule,
    EuroSATSARDataModule,
    EvalDataModule,
    GeoBenchDataModule,
    Landslide4SenseDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.datasets.bigearthnet import patch_folders
from terrafm_lightning.eval.datasets.copernicus import COPERNICUS_TASKS, torchgeo_root
from terrafm_lightning.eval.datasets.eurosat import class_folder_root
from terrafm_lightning.eval.datasets.geobench import task_key
from terrafm_lightning.eval.datasets.landslide4sense import LAYOUTS
from terrafm_lightning.eval.features import SplitFeatures, split_features
from terrafm_lightning.eval.finetune import FineTune
from terrafm_lightning.eval.knn import knn_evaluate
from terrafm_lightning.eval.linear_probe import linear_probe_on_features
from terrafm_lightning.eval.segmentation import SegmentationProbe
from terrafm_lightning.eval.task import BackboneTask
from terrafm_lightning.models.checkpoints import read_checkpoint
from terrafm_lightning.ssl.checkpoint import checkpoint_architecture

log = logging.getLogger(__name__)

DataModuleFactory = Callable[..., EvalDataModule]
Metrics = dict[str, float]


@dataclass(frozen=True)
class Found:
    """A dataset found under ``--data``: how to build its datamodule, and its paper row."""

    name: str
    root: Path
    factory: DataModuleFactory
    benchmark: str
    paper_key: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def _is_sar(folder: Path) -> bool:
    first = next(folder.glob("*/*.tif"), None)
    if first is None:
        return False
    with rasterio.open(first) as src:
        return src.count == 2


def detect(folder: Path, name: str) -> list[Found]:
    """The datasets whose layout ``folder`` is (several for a Copernicus-Bench root)."""
    tasks = [t for t in COPERNICUS_TASKS if torchgeo_root(folder, t) is not None]
    if tasks:
        return [
            Found(f"{name}/{t}", folder, CopernicusBenchDataModule, "copernicus",
                  f"copernicus/{t}", {"task": t})
            for t in tasks
        ]  # fmt: skip
    if (folder / "default_partition.json").is_file():
        key = f"geobench/{task_key(folder)}"
        return [Found(name, folder, GeoBenchDataModule, "geobench", key)]
    images = class_folder_root(folder, EuroSATDataModule.folders + EuroSATSARDataModule.folders)
    if images is not None:
        sar = _is_sar(images)
        factory = EuroSATSARDataModule if sar else EuroSATDataModule
        return [Found(name, folder, factory, "eurosat-sar" if sar else "eurosat")]
    hand = Path("v1.1", "data", "flood_events", "HandLabeled", "LabelHand")
    if (folder / "LabelHand").is_dir() or (folder / hand).is_dir():
        return [Found(name, folder, Sen1Floods11DataModule, "sen1floods11")]
    if any(all((folder / i).is_dir() for i, _ in f.values()) for f in LAYOUTS.values()):
        return [
            Found(name, folder, Landslide4SenseDataModule, "landslide4sense", "landslide4sense")
        ]
    if (folder / "metadata.parquet").is_file() or patch_folders(folder, "_B02.tif"):
        return [Found(name, folder, BigEarthNetDataModule, "bigearthnet")]
    if patch_folders(folder, "_VV.tif"):
        return [
            Found(name, folder, BigEarthNetDataModule, "bigearthnet", None, {"modalities": ["s1"]})
        ]
    return []


def find_datasets(data: Path, max_depth: int = 3) -> list[Found]:
    """Datasets under ``data`` (breadth-first, ``max_depth`` levels below it)."""
    if not data.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    found, frontier = [], [data]
    for _ in range(max_depth + 1):
        deeper = []
        for folder in frontier:
            here = detect(
                folder, folder.relative_to(data).as_posix() if folder != data else data.name
            )
            found += here
            if not here:
                deeper += sorted(sub for sub in folder.iterdir() if sub.is_dir())
        frontier = deeper
    return found


def main_metric(dm: EvalDataModule) -> str:
    """The headline metric of a datamodule's task (see the module docstring)."""
    if dm.task == "segmentation":
        return "miou"
    if isinstance(dm, CopernicusBenchDataModule):
        return dm.metric
    return "f1_micro" if dm.multilabel else "top1"


def seeded_subset(features: SplitFeatures, fraction: float, seed: int) -> SplitFeatures:
    """A deterministic random ``fraction`` of a split (at least one sample)."""
    n = features.features.shape[0]
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    keep = keep[: max(1, round(fraction * n))].sort().values
    return SplitFeatures(features.features[keep], features.labels[keep])


@dataclass
class Settings:
    """What ``make eval`` runs: probe epochs, seeds, which optional protocols."""

    epochs: int = 10
    probe_steps: int = 300
    finetune_epochs: int = 0
    upernet: bool = False
    seeds: int = 1
    batch_size: int = 64
    num_workers: int = 0
    split_seed: int | None = None


def _trainer(epochs: int) -> Trainer:
    return Trainer(
        max_epochs=epochs,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _train_and_test(module: BackboneTask, dm: EvalDataModule, epochs: int, seed: int) -> Metrics:
    seed_everything(seed, verbose=False)
    trainer = _trainer(epochs)
    trainer.fit(module, datamodule=dm)
    test = trainer.test(module, datamodule=dm, verbose=False)[0]
    return {k.removeprefix("test/"): v for k, v in test.items() if k != "test/loss"}


def evaluate_dataset(
    found: Found,
    dm: EvalDataModule,
    source: dict[str, Any],
    backbone: nn.Module,
    settings: Settings,
    cache: Path,
) -> dict[str, list[Metrics]]:
    """Protocol -> per-seed test metrics of one backbone source on one datamodule."""
    dm.setup("fit")
    seeds = range(settings.seeds)
    results: dict[str, list[Metrics]] = {}
    if dm.task == "classification":
        device = next(backbone.parameters()).device
        train, test = (
            split_features(backbone, dm.datasets[s], settings.batch_size, device,
                           cache / f"{s}.pt", desc=f"{found.name} {s} features")
            for s in ("train", "test")
        )  # fmt: skip
        args = (dm.num_classes,)
        kw = {"multilabel": dm.multilabel}
        results["kNN 100%"] = [knn_evaluate(*train, *test, *args, **kw)]
        results["kNN 1%"] = [
            knn_evaluate(*seeded_subset(train, 0.01, s), *test, *args, **kw) for s in seeds
        ]
        results["frozen probe"] = [
            linear_probe_on_features(train, test, *args, **kw, steps=settings.probe_steps, seed=s)
            for s in seeds
        ]
        if found.benchmark == "geobench" and settings.finetune_epochs > 0:
            results["fine-tune"] = [
                _train_and_test(
                    FineTune(num_classes=dm.num_classes, multilabel=dm.multilabel, **source),
                    dm, settings.finetune_epochs, s,
                )
                for s in seeds
            ]  # fmt: skip
        return results
    heads = ["linear"] + (["upernet"] if settings.upernet else [])
    for head in heads:
        results[f"{'linear' if head == 'linear' else 'UPerNet'} seg"] = [
            _train_and_test(
                SegmentationProbe(dm.num_classes, dm.ignore_index, head=head, **source),
                dm, settings.epochs, s,
            )
            for s in seeds
        ]  # fmt: skip
    return results


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean, standard deviation (0 for one value) and the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def paper_results() -> dict[str, Any]:
    """The paper's TerraFM-B numbers and their source (``paper_results.json``)."""
    text = resources.files("terrafm_lightning.eval").joinpath("paper_results.json").read_text()
    return json.loads(text)


def run(
    data: Path,
    out: Path,
    ckpt: Path | None = None,
    released: Path | None = None,
    backbone: str = "terrafm_base",
    backbone_kwargs: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Evaluate the backbone and its random-init baseline on every dataset; write the tables."""
    settings = settings or Settings()
    if (ckpt is None) == (released is None):
        raise ValueError("give exactly one of --ckpt and --released")
    if ckpt is not None:
        name, kwargs = checkpoint_architecture(read_checkpoint(ckpt))
        sources = {"checkpoint": {"checkpoint": str(ckpt)}}
    else:
        name, kwargs = backbone, dict(backbone_kwargs or {})
        sources = {"released": {"backbone": name, "backbone_kwargs": kwargs}}
        sources["released"]["released_weights"] = str(released)
    sources["random init"] = {"backbone": name, "backbone_kwargs": kwargs}
    datasets = find_datasets(data)
    if not datasets:
        raise FileNotFoundError(
            f"{data}: no EuroSAT, BigEarthNet, GEO-Bench, Sen1Floods11, Copernicus-Bench or "
            "Landslide4Sense data"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbones = {}
    for source, args in sources.items():
        seed_everything(0, verbose=False)
        backbones[source] = BackboneTask(**args).backbone.to(device)
    paper = paper_results()
    rows: list[dict[str, Any]] = []
    for found in tqdm(datasets, desc="make eval", unit="dataset"):
        start = time.perf_counter()
        try:
            dm = found.factory(
                found.root, batch_size=settings.batch_size, num_workers=settings.num_workers,
                missing_bands="fill", split_seed=settings.split_seed, **found.kwargs,
            )  # fmt: skip
            results = {
                s: evaluate_dataset(found, dm, args, backbones[s], settings,
                                    out / "features" / s.replace(" ", "_") / found.name)
                for s, args in sources.items()
            }  # fmt: skip
        except (ValueError, FileNotFoundError) as err:
            log.warning("skipping %s: %s", found.root, err)
            rows.append({"dataset": found.name, "path": str(found.root), "skipped": str(err)})
            continue
        metric = main_metric(dm)
        metrics = [(metric, "")]
        if found.benchmark == "landslide4sense":
            metrics.append(("iou_1", " (landslide IoU)"))
        for protocol in results[next(iter(sources))]:
            for metric_name, suffix in metrics:
                label = protocol + suffix
                rows.append(
                    {
                        "dataset": found.name,
                        "benchmark": found.benchmark,
                        "path": str(found.root),
                        "datamodule": type(dm).__name__,
                        "modalities": dm.modalities,
                        "protocol": label,
                        "metric": metric_name,
                        "paper": paper["rows"].get(found.paper_key or "", {}).get(label),
                        "mean_filled_bands": dm.filled_bands,
                        "samples": {s: len(d) for s, d in dm.datasets.items()},
                        "results": {
                            s: summarise([100 * r[metric_name] for r in results[s][protocol]])
                            for s in sources
                        },
                        "seconds": round(time.perf_counter() - start, 1),
                    }
                )
    report = {
        "backbone": name,
        "backbone_kwargs": kwargs,
        "sources": sources,
        "settings": vars(settings),
        "paper": {"model": paper["model"], "source": paper["source"]},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report))
    plot_table(report, out / "results.png")
    return report


def _cell(result: dict[str, Any]) -> str:
    if len(result["values"]) > 1:
        return f"{result['mean']:.1f} ± {result['std']:.1f}"
    return f"{result['mean']:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The headline metric (%) per dataset and protocol: each source, then the paper column."""
    sources = list(report["sources"])
    paper = f"paper {report['paper']['model']}"
    settings = report["settings"]
    lines = [
        f"Backbone `{report['backbone']}`; test split; seeds: {settings['seeds']}; probe "
        f"epochs: {settings['epochs']}; frozen-probe steps: {settings['probe_steps']}; "
        f"fine-tune epochs: {settings['finetune_epochs']}.",
        f"Paper column: {report['paper']['source']}",
        "",
        "| dataset | protocol | metric | " + " | ".join(sources) + f" | {paper} |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in sources) + " | ---: |",
    ]
    skipped = []
    for row in report["rows"]:
        if "skipped" in row:
            skipped.append(f"- `{row['dataset']}` skipped: {row['skipped']}")
            continue
        values = [_cell(row["results"][s]) for s in sources]
        reference = "–" if row["paper"] is None else f"{row['paper']:.1f}"
        lines.append(
            f"| {row['dataset']} | {row['protocol']} | {row['metric']} | "
            + " | ".join(values)
            + f" | {reference} |"
        )
    return "\n".join(lines + ([""] + skipped if skipped else [])) + "\n"


def plot_table(report: dict[str, Any], path: Path) -> Path:
    """Horizontal bars of every table row: each source and the paper value (when published)."""
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [r for r in report["rows"] if "skipped" not in r]
    sources = list(report["sources"])
    series = [*sources, "paper"]
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * max(len(rows), 1)))
    height = 0.8 / len(series)
    for j, name in enumerate(series):
        values = [
            (r["paper"] or 0.0) if name == "paper" else r["results"][name]["mean"] for r in rows
        ]
        errors = [0.0 if name == "paper" else r["results"][name]["std"] for r in rows]
        ax.barh([i + j * height for i in range(len(rows))], values, height, xerr=errors, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))])
    ax.set_yticklabels([f"{r['dataset']}: {r['protocol']} ({r['metric']})" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("%")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m terrafm_lightning.eval.report``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", type=Path, help="TerraFMPretrainModule checkpoint (teacher)")
    source.add_argument("--released", type=Path, help="released TerraFM-B/-L .pth weights")
    parser.add_argument("--backbone", default="terrafm_base", help="factory of --released")
    parser.add_argument("--backbone-kwargs", type=json.loads, default={}, help="JSON kwargs")
    parser.add_argument("--data", type=Path, required=True, help="folder holding the datasets")
    parser.add_argument("--out", type=Path, default=Path("eval_results"))
    parser.add_argument("--epochs", type=int, default=10, help="segmentation probe epochs")
    parser.add_argument("--probe-steps", type=int, default=300, help="frozen probe steps")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="GEO-Bench fine-tuning")
    parser.add_argument("--upernet", action="store_true", help="also the UPerNet probe")
    parser.add_argument("--seeds", type=int, default=1, help="repeats of seeded protocols")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument(
        "--split-seed", type=int, default=None,
        help="opt-in seeded split for datasets without their official split files",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = Settings(
        epochs=args.epochs,
        probe_steps=args.probe_steps,
        finetune_epochs=args.finetune_epochs,
        upernet=args.upernet,
        seeds=args.seeds,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        split_seed=args.split_seed,
    )
    run(
        args.data,
        args.out,
        ckpt=args.ckpt,
        released=args.released,
        backbone=args.backbone,
        backbone_kwargs=args.backbone_kwargs,
        settings=settings,
    )
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
