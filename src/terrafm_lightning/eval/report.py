"""``make eval``: kNN and linear probing over the datasets found under a folder, as a table.

Every dataset found under ``--data`` (recognised by layout, see :func:`find_datasets`) is
evaluated with the given backbone (a pretraining checkpoint, teacher branch, or the released
weights) and with a randomly initialised backbone of the same architecture as the baseline.
Classification datasets get kNN (cosine, k=20, T=0.07) and a linear probe on the CLS feature;
segmentation datasets get the linear patch-token probe. Metrics are on the test split: top-1
(multiclass), micro-F1 (multilabel) or mIoU. Results go to ``results.json`` and ``results.md``.

Usage::

    python -m terrafm_lightning.eval.report --ckpt last.ckpt --data /data/bench --out eval/
    python -m terrafm_lightning.eval.report --released TerraFM-B.pth --data /data/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning import Trainer, seed_everything

from terrafm_lightning.eval.datasets import (
    BigEarthNetDataModule,
    EuroSATDataModule,
    EuroSATSARDataModule,
    EvalDataModule,
    GeoBenchDataModule,
    Sen1Floods11DataModule,
)
from terrafm_lightning.eval.datasets.base import read_tif
from terrafm_lightning.eval.datasets.bigearthnet import patch_folders
from terrafm_lightning.eval.datasets.eurosat import EUROSAT_CLASSES
from terrafm_lightning.eval.knn import extract_features, knn_evaluate
from terrafm_lightning.eval.linear_probe import LinearProbe
from terrafm_lightning.eval.segmentation import SegmentationProbe
from terrafm_lightning.eval.task import BackboneTask
from terrafm_lightning.models.checkpoints import read_checkpoint
from terrafm_lightning.ssl.checkpoint import checkpoint_architecture

log = logging.getLogger(__name__)

DataModuleFactory = Callable[..., EvalDataModule]


def dataset_kind(folder: Path) -> DataModuleFactory | None:
    """The datamodule class of a dataset folder, or None if ``folder`` is not one."""
    if all((folder / c).is_dir() for c in EUROSAT_CLASSES):
        first = next((folder / EUROSAT_CLASSES[0]).glob("*.tif"), None)
        sar = first is not None and read_tif(first).shape[0] == 2
        return EuroSATSARDataModule if sar else EuroSATDataModule
    if (folder / "default_partition.json").is_file():
        return GeoBenchDataModule
    if (folder / "LabelHand").is_dir():
        return Sen1Floods11DataModule
    if patch_folders(folder, "_B02.tif") or patch_folders(folder, "_VV.tif"):
        return BigEarthNetDataModule
    return None


def find_datasets(data: Path, max_depth: int = 3) -> list[tuple[str, Path, DataModuleFactory]]:
    """Datasets under ``data`` (breadth-first, ``max_depth`` levels): (name, folder, class)."""
    if not data.is_dir():
        raise FileNotFoundError(f"data folder not found: {data}")
    found, frontier = [], [data]
    for _ in range(max_depth + 1):
        deeper = []
        for folder in frontier:
            kind = dataset_kind(folder)
            if kind is not None:
                found.append((folder.relative_to(data).as_posix() or folder.name, folder, kind))
            else:
                deeper += sorted(sub for sub in folder.iterdir() if sub.is_dir())
        frontier = deeper
    return found


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


def evaluate_dataset(
    dm: EvalDataModule, source: dict[str, Any], epochs: int
) -> dict[str, dict[str, float]]:
    """Protocol -> test metrics of one backbone source on one datamodule."""
    dm.setup("fit")
    results: dict[str, dict[str, float]] = {}
    if dm.task == "classification":
        seed_everything(0, verbose=False)
        backbone = BackboneTask(**source).backbone
        bank = extract_features(backbone, dm.train_dataloader())
        queries = extract_features(backbone, dm.test_dataloader())
        results["knn"] = knn_evaluate(*bank, *queries, dm.num_classes, multilabel=dm.multilabel)
        probe = LinearProbe(dm.num_classes, dm.multilabel, **source)
    else:
        probe = SegmentationProbe(dm.num_classes, dm.ignore_index, **source)
    seed_everything(0, verbose=False)
    trainer = _trainer(epochs)
    trainer.fit(probe, datamodule=dm)
    test = trainer.test(probe, datamodule=dm, verbose=False)[0]
    results["linear"] = {k.removeprefix("test/"): v for k, v in test.items() if k != "test/loss"}
    return results


def main_metric(dm: EvalDataModule) -> str:
    """The headline metric of a datamodule's task."""
    if dm.task == "segmentation":
        return "miou"
    return "f1_micro" if dm.multilabel else "top1"


def run(
    data: Path,
    out: Path,
    ckpt: Path | None = None,
    released: Path | None = None,
    backbone: str = "terrafm_base",
    backbone_kwargs: dict[str, Any] | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Evaluate the backbone and its random-init baseline on every dataset; write the tables."""
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
        raise FileNotFoundError(f"{data}: no EuroSAT, BigEarthNet, GEO-Bench or Sen1Floods11 data")
    rows: list[dict[str, Any]] = []
    for dataset, folder, kind in datasets:
        start = time.perf_counter()
        try:
            dm = kind(folder, batch_size=batch_size, num_workers=num_workers, missing_bands="fill")
            results = {s: evaluate_dataset(dm, args, epochs) for s, args in sources.items()}
        except (ValueError, FileNotFoundError) as err:
            log.warning("skipping %s: %s", folder, err)
            rows.append({"dataset": dataset, "path": str(folder), "skipped": str(err)})
            continue
        for protocol in results[next(iter(sources))]:
            rows.append(
                {
                    "dataset": dataset,
                    "path": str(folder),
                    "datamodule": type(dm).__name__,
                    "modalities": dm.modalities,
                    "protocol": protocol,
                    "metric": main_metric(dm),
                    "mean_filled_bands": dm.filled_bands,
                    "samples": {s: len(d) for s, d in dm.datasets.items()},
                    "results": {s: results[s][protocol] for s in sources},
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
    report = {"backbone": name, "backbone_kwargs": kwargs, "sources": sources, "epochs": epochs}
    report["rows"] = rows
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown_table(report))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The headline metric (%) of every dataset and protocol, one column per backbone source."""
    sources = list(report["sources"])
    lines = [
        f"Backbone `{report['backbone']}`; linear probes trained {report['epochs']} epochs; "
        "test split.",
        "",
        "| dataset | protocol | metric | " + " | ".join(sources) + " |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in sources) + " |",
    ]
    skipped = []
    for row in report["rows"]:
        if "skipped" in row:
            skipped.append(f"- `{row['dataset']}` skipped: {row['skipped']}")
            continue
        values = [f"{100 * row['results'][s][row['metric']]:.1f}" for s in sources]
        lines.append(
            f"| {row['dataset']} | {row['protocol']} | {row['metric']} | "
            + " | ".join(values)
            + " |"
        )
    return "\n".join(lines + ([""] + skipped if skipped else [])) + "\n"


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
    parser.add_argument("--epochs", type=int, default=10, help="linear probe epochs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(
        args.data,
        args.out,
        ckpt=args.ckpt,
        released=args.released,
        backbone=args.backbone,
        backbone_kwargs=args.backbone_kwargs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
