"""The demo report: ``results.json`` and a ``README.md`` summary pointing at the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from terrafm_lightning.modalities import WORLDCOVER_CLASSES

FIGURES = {
    "training.png": "Loss and schedules (lr, weight decay, teacher momentum and temperature)",
    "pca_feature_maps.png": "Patch-token PCA feature maps of S2 and S1 next to the RGB view",
    "class_shares.png": "WorldCover class shares before vs after weighted sampling",
    "knn_per_class.png": "Per-class kNN accuracy, pretrained vs random init (rare classes shaded)",
}


def rare_class_accuracy(per_class: list[float | None], codes: list[int], rare: list[int]) -> float:
    """Mean accuracy over the rare classes that have query tiles (NaN if none has)."""
    values = [a for a, c in zip(per_class, codes, strict=True) if c in rare and a is not None]
    return sum(values) / len(values) if values else float("nan")


def summary_table(results: dict[str, Any]) -> str:
    """Markdown table: protocol x metric, one column per backbone plus the margin."""
    names = list(results["backbones"])
    rows = [
        ("kNN (k=20, cosine, T=0.07)", "top-1", "knn", "top1"),
        ("kNN", "macro F1", "knn", "f1_macro"),
        ("kNN", "rare-class accuracy", "knn", "rare_accuracy"),
        ("linear probe", "top-1", "linear", "top1"),
        ("linear probe", "macro F1", "linear", "f1_macro"),
    ]
    lines = [
        "| protocol | metric | " + " | ".join(names) + " | margin |",
        "| --- | --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for protocol, label, group, key in rows:
        values = [100 * results["backbones"][n][group][key] for n in names]
        margin = values[0] - values[-1]
        cells = " | ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {protocol} | {label} | {cells} | {margin:+.1f} |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write ``results.json`` and ``README.md`` into ``out``; returns the README path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    setup = results["setup"]
    rare = ", ".join(f"{c} {WORLDCOVER_CLASSES[c]}" for c in setup["rare_classes"])
    timings = " | ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items())
    centring = "dual (TerraFM)" if setup["centering"] == "dual" else "plain DINO (ablation)"
    lines = [
        f"# TerraFM demo report: {centring} centring",
        "",
        f"`{setup['backbone']}` ({setup['backbone_kwargs']}) pretrained for {setup['epochs']} "
        f"epochs ({setup['steps']} optimizer steps, batch {setup['batch_size']}) on a synthetic "
        f"store of {setup['tiles']} tiles of {setup['tile_size']} px "
        f"(S1, S2 L1C, S2 L2A, WorldCover; gain range {setup['gain_range']}), with "
        f"`{setup['modality_draw']}` modality draws (fusion when several are drawn), "
        f"{centring} centring and WorldCover-weighted sampling (tau {setup['tau']}).",
        "",
        f"Evaluation: frozen teacher CLS features of whole tiles; labels = dominant WorldCover "
        f"class; kNN bank / probe training set = the {setup['train_tiles']} pretraining tiles, "
        f"queries = {setup['heldout_tiles']} held-out tiles never seen in pretraining. "
        f"Rare classes (store share < {setup['high_frequency_threshold']}): {rare}.",
        "",
        summary_table(results),
        "",
        f"**kNN top-1: pretrained {100 * results['knn_top1']['pretrained']:.1f} % vs random init "
        f"{100 * results['knn_top1']['random init']:.1f} % "
        f"({100 * results['knn_margin']:+.1f} points).**",
        "",
        f"Wall time: {timings} | total {results['total_seconds']:.0f} s ({setup['machine']}).",
        "",
    ]
    for name, caption in FIGURES.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme
