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
    """Markdown table: view x protocol, one column per backbone plus the margin."""
    names = list(results["backbones"])
    metrics = (
        ("kNN top-1", "knn", "top1"),
        ("kNN rare-class acc.", "knn", "rare_accuracy"),
        ("kNN macro F1", "knn", "f1_macro"),
        ("linear top-1", "linear", "top1"),
    )
    lines = [
        "| view | metric (%) | " + " | ".join(names) + " | margin |",
        "| --- | --- | " + " | ".join("---:" for _ in names) + " | ---: |",
    ]
    for view in results["knn_top1"]:
        for label, group, key in metrics:
            values = [100 * results["backbones"][n][view][group][key] for n in names]
            cells = " | ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {view} | {label} | {cells} | {values[0] - values[-1]:+.1f} |")
    return "\n".join(lines)


def centring_comparison(results: dict[str, Any], other: dict[str, Any]) -> str:
    """Markdown table of the pretrained encoder under dual vs plain DINO centring."""
    runs = sorted([results, other], key=lambda r: r["setup"]["centering"] != "dual")
    lines = [
        "| view | metric (%) | dual centring | plain DINO centring | difference |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for view in results["knn_top1"]:
        for label, key in (("kNN top-1", "top1"), ("kNN rare-class acc.", "rare_accuracy")):
            values = [100 * r["backbones"]["pretrained"][view]["knn"][key] for r in runs]
            lines.append(
                f"| {view} | {label} | {values[0]:.1f} | {values[1]:.1f} | "
                f"{values[0] - values[1]:+.1f} |"
            )
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, Any], other: dict[str, Any] | None = None) -> Path:
    """Write ``results.json`` and ``README.md`` into ``out``; returns the README path.

    ``other`` is the results of the same demo with the other centring mode; when given, the
    README compares the two (dual centring targets the rare classes).
    """
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
        f"(S1, S2 L1C, S2 L2A, WorldCover; gain range {setup['gain_range']}, per-sensor nuisance "
        f"{setup['nuisance']}), with "
        f"`{setup['modality_draw']}` modality draws (fusion when several are drawn), "
        f"{centring} centring and WorldCover-weighted sampling (tau {setup['tau']}).",
        "",
        "Baseline: `random init` is the same architecture with the initial weights pretraining "
        "started from (same seed).",
        "",
        f"Evaluation: frozen teacher CLS features of whole tiles; labels = dominant WorldCover "
        f"class; kNN bank / probe training set = the {setup['train_tiles']} pretraining tiles, "
        f"queries = {setup['heldout_tiles']} held-out tiles never seen in pretraining. "
        f"Rare classes (store share < {setup['high_frequency_threshold']}): {rare}.",
        "",
        summary_table(results),
        "",
        "kNN: cosine similarity, k = 20, votes exp(s / 0.07) (the paper's protocol). Views: "
        "`fused` = every modality the tile has (cross-attention fusion), `S1` / `S2 L2A` = that "
        "modality alone. Rare-class accuracy = mean recall over the rare classes with queries.",
        "",
        "**kNN top-1, pretrained vs random init:** "
        + "; ".join(
            f"{view} {100 * t['pretrained']:.1f} vs {100 * t['random init']:.1f} "
            f"({100 * (t['pretrained'] - t['random init']):+.1f})"
            for view, t in results["knn_top1"].items()
        )
        + ".",
        "",
        f"Wall time: {timings} | total {results['total_seconds']:.0f} s ({setup['machine']}).",
        "",
    ]
    if other is not None and other["setup"]["centering"] != setup["centering"]:
        lines += [
            "## Dual centring vs plain DINO centring (pretrained encoder)",
            "",
            f"Same demo, other centring mode read from `{other['setup']['report']}`:",
            "",
            centring_comparison(results, other),
            "",
        ]
    for name, caption in FIGURES.items():
        lines += [f"## {caption}", "", f"![{caption}]({name})", ""]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme
