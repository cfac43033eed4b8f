"""PNG figures of the demo report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from torch import Tensor  # noqa: E402

from terrafm_lightning.modalities import WORLDCOVER_CLASSES  # noqa: E402

# ESA WorldCover legend colours.
WORLDCOVER_COLOURS: dict[int, str] = {
    10: "#006400",
    20: "#ffbb22",
    30: "#ffff4c",
    40: "#f096ff",
    50: "#fa0000",
    60: "#b4b4b4",
    70: "#f0f0f0",
    80: "#0064c8",
    90: "#0096a0",
    95: "#00cf75",
    100: "#fae6a0",
}
TRAINING_PANELS = (
    ("train/loss", "DINO loss"),
    ("train/lr", "learning rate"),
    ("train/weight_decay", "weight decay"),
    ("train/momentum", "teacher EMA momentum"),
    ("train/teacher_temp", "teacher temperature"),
    ("train/teacher_entropy", "teacher entropy"),
)
DPI = 110


def _label(code: int) -> str:
    return f"{code} {WORLDCOVER_CLASSES[code]}"


def plot_training(metrics_csv: Path, out: Path) -> Path:
    """Loss and every per-step schedule of the pretraining run (CSVLogger ``metrics.csv``)."""
    frame = pd.read_csv(metrics_csv)
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), constrained_layout=True)
    for ax, (column, title) in zip(axes.flat, TRAINING_PANELS, strict=True):
        series = frame[["step", column]].dropna() if column in frame else frame.iloc[:0]
        marker = "o" if len(series) < 20 else None  # a line of one point is invisible
        ax.plot(series["step"], series[column], color="tab:blue", lw=1.2, marker=marker)
        if column == "train/loss" and len(series) > 5:
            smooth = series[column].rolling(max(len(series) // 15, 2), min_periods=1).mean()
            ax.plot(series["step"], smooth, color="tab:red", lw=2, label="running mean")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle("Pretraining: loss and schedules")
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_class_shares(
    codes: Sequence[int],
    before: np.ndarray,
    after: np.ndarray,
    rare: Sequence[int],
    out: Path,
) -> Path:
    """WorldCover class shares of the training tiles, uniform vs weighted sampling."""
    x = np.arange(len(codes))
    fig, ax = plt.subplots(figsize=(11, 4.8), constrained_layout=True)
    ax.bar(x - 0.2, 100 * before, 0.4, label="uniform tile sampling", color="tab:gray")
    ax.bar(x + 0.2, 100 * after, 0.4, label="WorldCover-weighted sampling", color="tab:green")
    _mark_rare(ax, codes, rare)
    ax.set_yscale("log")
    ax.set_ylim(bottom=max(1e-3, 0.5 * 100 * min(v for v in (*before, *after) if v > 0)))
    ax.set_xticks(x, [_label(c) for c in codes], rotation=30, ha="right")
    ax.set_ylabel("expected pixel share per draw (%, log)")
    ax.set_title("WorldCover class shares before vs after weighted sampling (shaded: rare classes)")
    ax.legend()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _mark_rare(ax: plt.Axes, codes: Sequence[int], rare: Sequence[int]) -> None:
    for i, code in enumerate(codes):
        if code in rare:
            ax.axvspan(i - 0.5, i + 0.5, color="tab:orange", alpha=0.15, lw=0, zorder=0)


def plot_per_class_knn(
    codes: Sequence[int],
    panels: dict[str, dict[str, list[float | None]]],
    support: dict[str, Sequence[int]],
    rare: Sequence[int],
    out: Path,
) -> Path:
    """Per-class kNN accuracy of each backbone, one panel per view; rare classes shaded.

    Args:
        codes: WorldCover class codes (x axis).
        panels: view -> backbone name -> accuracy per class (None: no query tile).
        support: view -> query tiles per class.
        rare: codes to shade.
        out: PNG path.
    """
    x = np.arange(len(codes))
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(11, 3.2 * len(panels) + 1.2), sharex=True, squeeze=False
    )
    colours = ("tab:blue", "tab:gray", "tab:purple", "tab:olive")
    for ax, (view, accuracies) in zip(axes[:, 0], panels.items(), strict=True):
        width = 0.8 / len(accuracies)
        for j, (name, values) in enumerate(accuracies.items()):
            heights = [100 * v if v is not None else 0.0 for v in values]
            offset = (j - (len(accuracies) - 1) / 2) * width
            ax.bar(x + offset, heights, width, label=name, color=colours[j % len(colours)])
        for i, n in enumerate(support[view]):
            ax.text(i, 101, f"n={n}", ha="center", va="bottom", fontsize=7)
        _mark_rare(ax, codes, rare)
        ax.set_ylim(0, 112)
        ax.set_ylabel("kNN accuracy (%)")
        ax.set_title(f"{view} view", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
    labels = [f"{_label(c)}{' (rare)' if c in rare else ''}" for c in codes]
    axes[-1, 0].set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle("Per-class kNN accuracy on held-out tiles (n = query tiles; shaded: rare classes)")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def pca_rgb(tokens: Tensor) -> Tensor:
    """First three principal components of (..., N, d) tokens -> (..., N, 3) RGB in [0, 1].

    One projection for all given tokens, so colours are comparable across the tiles shown.
    """
    flat = tokens.reshape(-1, tokens.shape[-1]).float()
    centred = flat - flat.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=3, center=False)
    components = centred @ v[:, :3]
    low, high = components.quantile(0.02, dim=0), components.quantile(0.98, dim=0)
    rgb = ((components - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    return rgb.reshape(*tokens.shape[:-1], 3)


def plot_pca_maps(
    rgb: np.ndarray,
    worldcover: np.ndarray,
    maps: dict[str, np.ndarray],
    titles: Sequence[str],
    out: Path,
) -> Path:
    """Rows of tiles: S2 RGB, WorldCover, then one PCA feature map per backbone / modality.

    Args:
        rgb: (n, H, W, 3) true-colour S2 views in [0, 1].
        worldcover: (n, H, W) class codes.
        maps: column title -> (n, h, w, 3) PCA colours of the patch tokens.
        titles: one title per row (the tile).
        out: PNG path.
    """
    n = rgb.shape[0]
    columns = 2 + len(maps)
    fig, axes = plt.subplots(n, columns, figsize=(2.3 * columns, 2.4 * n), squeeze=False)
    codes = sorted(WORLDCOVER_COLOURS)
    cmap = ListedColormap([WORLDCOVER_COLOURS[c] for c in codes])
    index = np.searchsorted(codes, np.where(worldcover == 0, codes[0], worldcover))
    for row in range(n):
        panels = [("S2 L2A RGB", rgb[row]), ("WorldCover", None)] + [
            (name, values[row]) for name, values in maps.items()
        ]
        for col, (name, image) in enumerate(panels):
            ax = axes[row, col]
            if image is None:
                ax.imshow(index[row], cmap=cmap, vmin=-0.5, vmax=len(codes) - 0.5)
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        axes[row, 0].set_ylabel(titles[row], fontsize=8)
    fig.suptitle("Patch-token PCA (3 components -> RGB) of held-out tiles, one modality at a time")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
