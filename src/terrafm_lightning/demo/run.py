"""``make demo``: synthetic store -> TerraFM pretraining -> kNN / linear probes -> report.

Runs, in one process: ``terrafm-data synthetic`` (a small store with a held-out split),
``terrafm fit --config experiments/demo.yaml`` (progress bar on), then kNN (paper protocol) and
linear probing of the pretrained teacher against a random-init backbone of the same
architecture, and writes ``README.md``, ``results.json`` and PNG plots into ``--out``.

Usage::

    python -m terrafm_lightning.demo.run                          # reports/demo
    python -m terrafm_lightning.demo.run --no-dual-centering      # reports/demo-dino-centering
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import xarray as xr
from torch.utils.data import DataLoader

from terrafm_lightning.cli import run_cli
from terrafm_lightning.data.datamodule import TerraFMDataModule
from terrafm_lightning.data.dataset import collate_tile_batch
from terrafm_lightning.demo import plots
from terrafm_lightning.demo.evaluate import (
    VIEWS,
    knn_results,
    tile_features,
)
from terrafm_lightning.demo.report import rare_class_accuracy, write_report
from terrafm_lightning.eval.linear_probe import linear_probe_on_features
from terrafm_lightning.modalities import BANDS, MODALITIES
from terrafm_lightning.models import TerraFM
from terrafm_lightning.prep.sources.synthetic import prepare_synthetic

RGB_BANDS = ("B04", "B03", "B02")
PCA_SCALE = 2
"""PCA maps embed tiles upsampled this much, for a finer token grid (pos. embed interpolated)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the demo."""
    parser = argparse.ArgumentParser(
        prog="python -m terrafm_lightning.demo.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", default="experiments/demo.yaml", help="pretraining config")
    parser.add_argument("--out", type=Path, default=None, help="report folder")
    parser.add_argument("--work", type=Path, default=Path("outputs/demo"), help="store, logs")
    parser.add_argument("--samples", type=int, default=800, help="synthetic tiles")
    parser.add_argument("--tile-size", type=int, default=64, help="tile size in pixels")
    parser.add_argument(
        "--gain-range",
        type=float,
        nargs=2,
        default=(0.5, 1.5),
        metavar=("LOW", "HIGH"),
        help="per-tile S2 illumination gain of the synthetic scenes (task difficulty)",
    )
    parser.add_argument(
        "--nuisance",
        type=float,
        default=1.0,
        help="per-sensor illumination / haze / S1 calibration nuisance of the synthetic scenes "
        "(not shared between sensors: cross-modal distillation learns to ignore it)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--depth", type=int, default=None, help="override the backbone depth")
    parser.add_argument(
        "--no-dual-centering",
        action="store_true",
        help="plain DINO centring instead of TerraFM's dual centring (ablation)",
    )
    parser.add_argument("--seed", type=int, default=0, help="store, split and init seed")
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="report folder of the other centring mode to compare with (default: its usual "
        "folder next to --out, when it exists)",
    )
    args = parser.parse_args(argv)
    folders = {False: "demo", True: "demo-dino-centering"}
    if args.out is None:
        args.out = Path("reports") / folders[args.no_dual_centering]
    if args.compare is None:
        args.compare = args.out.parent / folders[not args.no_dual_centering]
    return args


def write_store(args: argparse.Namespace, store: Path) -> None:
    """``terrafm-data synthetic`` through its Python API (no dask cluster: the tiles are small)."""
    print(f"$ terrafm-data synthetic {store} --samples {args.samples} ...", flush=True)
    report = prepare_synthetic(
        str(store),
        args.samples,
        args.tile_size,
        args.seed,
        tuple(args.gain_range),
        nuisance=args.nuisance,
        overwrite=True,
        scheduler="sync",
    )
    print(report.summary(), flush=True)


def pretrain(args: argparse.Namespace, store: Path) -> Any:
    """``terrafm fit --config <config>`` in process; returns the LightningCLI (model, data)."""
    centering = "dino" if args.no_dual_centering else "dual"
    log_dir = args.work / "pretrain" / centering
    shutil.rmtree(log_dir, ignore_errors=True)
    command = [
        "fit", "--config", args.config, "--seed_everything", str(args.seed),
        "--data.init_args.path", str(store), "--data.init_args.seed", str(args.seed),
        "--model.init_args.centering", centering,
        "--trainer.default_root_dir", str(args.work),
        "--trainer.logger.init_args.save_dir", str(args.work),
        "--trainer.logger.init_args.version", centering,
    ]  # fmt: skip
    if args.epochs is not None:
        command += ["--trainer.max_epochs", str(args.epochs)]
    if args.depth is not None:
        command += ["--model.init_args.backbone_kwargs.depth", str(args.depth)]
    print("$ terrafm " + " ".join(command), flush=True)
    return run_cli(command)


def random_backbone(name: str, kwargs: dict[str, Any], seed: int) -> TerraFM:
    """The random-init baseline: the same architecture, freshly initialised."""
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


@torch.no_grad()
def pca_figure(
    backbones: dict[str, TerraFM], dm: TerraFMDataModule, store: Path, out: Path, n: int = 4
) -> Path:
    """PCA maps of held-out tiles that have every modality, one per dominant class first."""
    dataset = dm.val_dataset
    complete = np.flatnonzero(dataset.available.all(axis=1))
    order = sorted(complete, key=lambda k: (dataset.dominant_class[k], k))
    picked, seen = [], set()
    for k in order:  # one tile per dominant class, then fill up
        if dataset.dominant_class[k] not in seen:
            picked.append(k)
            seen.add(dataset.dominant_class[k])
    picked = (picked + [k for k in order if k not in picked])[:n]
    loader = DataLoader(
        dataset, batch_size=len(picked), sampler=picked, collate_fn=collate_tile_batch
    )
    batch = next(iter(loader))
    size = PCA_SCALE * next(batch[m] for m in MODALITIES if m in batch).shape[-1]
    inputs = dm.multicrop.whole_tiles(batch, size=size)["inputs"]
    grid = size // 16
    maps = {}
    for name, backbone in backbones.items():
        backbone.eval()
        for modality, label in (("s2_l2a", "S2 L2A"), ("s1", "S1")):
            presence = torch.zeros(len(picked), len(MODALITIES), dtype=torch.bool)
            presence[:, MODALITIES.index(modality)] = True
            tokens = backbone.forward_features(inputs, presence)[:, 1:]
            rgb = plots.pca_rgb(tokens).reshape(len(picked), grid, grid, 3)
            maps[f"{name}: {label}"] = rgb.numpy()
    l2a = batch["s2_l2a"].float().numpy()
    rgb_bands = [BANDS["s2_l2a"].index(b) for b in RGB_BANDS]
    true_colour = np.clip(l2a[:, rgb_bands].transpose(0, 2, 3, 1) / 10000 * 3.5, 0, 1)
    indices = batch["index"].tolist()
    classes = xr.open_zarr(store)["worldcover"].isel(sample=indices).values
    dominant = batch["dominant_class"].tolist()
    titles = [f"tile {i}\ndominant {c}" for i, c in zip(indices, dominant, strict=True)]
    return plots.plot_pca_maps(true_colour, classes, maps, titles, out)


def evaluate(
    backbones: dict[str, TerraFM], dm: TerraFMDataModule
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Per backbone and view: kNN and linear-probe results; and the query count per class."""
    num_classes = len(dm.classes)
    results: dict[str, Any] = {}
    support: dict[str, list[int]] = {}
    for name, backbone in backbones.items():
        bank, queries = (
            tile_features(backbone, dm, dm.train_dataset),
            tile_features(backbone, dm, dm.val_dataset),
        )
        results[name] = {}
        for view in VIEWS:
            knn = knn_results(bank[view], queries[view], num_classes)
            knn["rare_accuracy"] = rare_class_accuracy(
                knn["per_class"], dm.classes, rare_classes(dm)
            )
            linear = linear_probe_on_features(bank[view], queries[view], num_classes)
            results[name][view] = {"knn": knn, "linear": linear}
            support[view] = torch.bincount(queries[view].labels, minlength=num_classes).tolist()
            print(
                f"{name:>12} {view:>6}: kNN top-1 {100 * knn['top1']:5.1f} %, rare-class kNN "
                f"{100 * knn['rare_accuracy']:5.1f} %, linear top-1 {100 * linear['top1']:5.1f} %",
                flush=True,
            )
    return results, support


def rare_classes(dm: TerraFMDataModule) -> list[int]:
    """Classes below the datamodule's high-frequency threshold (those dual centring protects)."""
    return [c for c in dm.classes if c not in dm.high_frequency_classes]


def class_shares(dm: TerraFMDataModule) -> tuple[np.ndarray, np.ndarray]:
    """Expected pixel class shares per draw: uniform over training tiles vs sampler weights."""
    hist = dm.train_dataset.worldcover_hist.astype(np.float64)
    weights = dm.train_weights / dm.train_weights.sum()
    return hist.mean(axis=0), weights @ hist


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the results written to ``results.json``."""
    args = parse_args(argv)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    args.work.mkdir(parents=True, exist_ok=True)
    store = args.work / "store.zarr"

    write_store(args, store)
    seconds["store"] = time.perf_counter() - start

    cli = pretrain(args, store)
    seconds["pretraining"] = time.perf_counter() - start - sum(seconds.values())
    module, dm, trainer = cli.model, cli.datamodule, cli.trainer
    hp = module.hparams
    backbones = {
        "pretrained": module.teacher.backbone,
        "random init": random_backbone(hp.backbone, dict(hp.backbone_kwargs or {}), args.seed),
    }

    print("Evaluating on held-out tiles (labels: dominant WorldCover class) ...", flush=True)
    evaluation, support = evaluate(backbones, dm)
    seconds["evaluation"] = time.perf_counter() - start - sum(seconds.values())

    args.out.mkdir(parents=True, exist_ok=True)
    rare = rare_classes(dm)
    plots.plot_training(Path(trainer.logger.log_dir) / "metrics.csv", args.out / "training.png")
    pca_figure(backbones, dm, store, args.out / "pca_feature_maps.png")
    before, after = class_shares(dm)
    plots.plot_class_shares(dm.classes, before, after, rare, args.out / "class_shares.png")
    per_class = {
        view: {name: r[view]["knn"]["per_class"] for name, r in evaluation.items()}
        for view in VIEWS
    }
    plots.plot_per_class_knn(dm.classes, per_class, support, rare, args.out / "knn_per_class.png")
    seconds["report"] = time.perf_counter() - start - sum(seconds.values())

    dm_hp = dm.hparams
    results = {
        "setup": {
            "backbone": hp.backbone,
            "backbone_kwargs": dict(hp.backbone_kwargs or {}),
            "centering": hp.centering,
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "batch_size": dm_hp.batch_size,
            "modality_draw": dm_hp.modality_draw,
            "tau": dm_hp.tau,
            "high_frequency_threshold": dm_hp.high_frequency_threshold,
            "tiles": args.samples,
            "tile_size": args.tile_size,
            "gain_range": list(args.gain_range),
            "nuisance": args.nuisance,
            "train_tiles": len(dm.train_dataset),
            "heldout_tiles": len(dm.val_dataset),
            "rare_classes": rare,
            "classes": dm.classes,
            "query_support": support,
            "views": {view: modality or "all available" for view, modality in VIEWS.items()},
            "report": str(args.out),
            "checkpoint": trainer.checkpoint_callback.last_model_path
            if trainer.checkpoint_callback
            else None,
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads",
        },
        "backbones": evaluation,
        "knn_top1": {
            view: {name: r[view]["knn"]["top1"] for name, r in evaluation.items()} for view in VIEWS
        },
        "seconds": seconds,
        "total_seconds": time.perf_counter() - start,
    }
    other_json = args.compare / "results.json"
    other = json.loads(other_json.read_text()) if other_json.is_file() else None
    readme = write_report(args.out, results, other)
    for view, top1 in results["knn_top1"].items():  # fused first: the paper's setting
        label = f"{view}, all modalities" if VIEWS[view] is None else view
        print(
            f"kNN top-1 on held-out tiles ({label}): pretrained {100 * top1['pretrained']:.1f} % "
            f"vs random init {100 * top1['random init']:.1f} % "
            f"({100 * (top1['pretrained'] - top1['random init']):+.1f} points)",
            flush=True,
        )
    print(f"Report: {readme}", flush=True)
    return results


if __name__ == "__main__":
    main()
