"""Rendering a ``make eval`` report (the dict of ``results.json``): markdown table and bar plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib


def _cell(result: dict[str, Any]) -> str:
    if len(result["values"]) > 1:
        return f"{result['mean']:.1f} ± {result['std']:.1f}"
    return f"{result['mean']:.1f}"


def _sizes(samples: dict[str, int]) -> str:
    return "/".join(str(samples[s]) for s in ("train", "val", "test"))


def markdown_table(report: dict[str, Any]) -> str:
    """The headline metric (%) per dataset and protocol, then what was not evaluated and why.

    Columns: each backbone source, the paper's value, the samples per split
    (train/val/test) and the row's warnings (overlapping or tiny splits).
    """
    sources = list(report["sources"])
    paper = f"paper {report['paper']['model']}"
    settings = report["settings"]
    lines = [
        f"Backbone `{report['backbone']}`; test split; seeds: {settings['seeds']}; probe "
        f"epochs: {settings['epochs']}; frozen-probe steps: {settings['probe_steps']}; "
        f"fine-tune epochs: {settings['finetune_epochs']}.",
        f"Paper column: {report['paper']['source']}",
        "",
        "| dataset | protocol | metric | " + " | ".join(sources) + f" | {paper} | n train/val/test "
        "| warning |",
        "| --- | --- | --- | " + " | ".join("---:" for _ in sources) + " | ---: | ---: | --- |",
    ]
    for row in report["rows"]:
        values = [_cell(row["results"][s]) for s in sources]
        reference = "–" if row["paper"] is None else f"{row['paper']:.1f}"
        lines.append(
            f"| {row['dataset']} | {row['protocol']} | {row['metric']} | "
            + " | ".join(values)
            + f" | {reference} | {_sizes(row['samples'])} | {'; '.join(row['warnings'])} |"
        )
    skipped = report["not_evaluated"]
    if skipped:
        lines += ["", "Not evaluated:", ""]
        lines += [f"- `{s['path']}` ({s['benchmark']}): {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def plot_table(report: dict[str, Any], path: Path) -> Path:
    """Horizontal bars of every table row: each source and the paper value (when published)."""
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["rows"]
    series = [*report["sources"], "paper"]
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
