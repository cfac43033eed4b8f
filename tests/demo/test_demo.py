"""`make demo` pipeline end to end on a tiny setting: store, `terrafm fit`, probes, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from terrafm_lightning.demo.evaluate import VIEWS
from terrafm_lightning.demo.report import FIGURES
from terrafm_lightning.demo.run import main, parse_args

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "demo.yaml"


@pytest.mark.slow
def test_demo_writes_report_with_readable_plots(tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["--config", str(CONFIG), "--work", str(tmp_path / "work"), "--out", str(out)]
    results = main([*args, "--samples", "48", "--epochs", "1", "--depth", "1"])

    assert (tmp_path / "work" / "store.zarr" / "zarr.json").is_file()
    assert Path(results["setup"]["checkpoint"]).is_file()
    setup = {k: v for k, v in results["setup"].items() if k not in ("checkpoint", "machine")}
    assert setup == {
        "backbone": "terrafm_tiny",
        "backbone_kwargs": {"depth": 1, "img_size": 64},
        "batch_size": 32,
        "centering": "dual",
        "classes": [10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100],
        "epochs": 1,
        "gain_range": [0.5, 1.5],
        "heldout_tiles": 12,  # val_fraction 0.25 of 48 tiles
        "high_frequency_threshold": 0.1,
        "modality_draw": "subset",
        "nuisance": 1.0,
        # Held-out tiles per dominant class; one has no S2 L2A, all enter the fused view.
        "query_support": {
            "fused": [2, 0, 4, 2, 0, 1, 0, 3, 0, 0, 0],
            "S1": [2, 0, 4, 2, 0, 1, 0, 3, 0, 0, 0],
            "S2 L2A": [1, 0, 4, 2, 0, 1, 0, 3, 0, 0, 0],
        },
        "rare_classes": [20, 50, 60, 70, 80, 90, 95, 100],
        "report": str(out),
        "steps": 1,  # 36 training tiles, batch 32
        "tau": 0.5,
        "tile_size": 64,
        "tiles": 48,
        "train_tiles": 36,
        "views": {"fused": "all available", "S1": "s1", "S2 L2A": "s2_l2a"},
    }
    # The one step runs at the warm-up's lr 0, so the teacher is still its (seeded) init: the
    # pretrained backbone scores exactly as the random-init baseline of the same seed.
    assert results["backbones"]["pretrained"] == results["backbones"]["random init"]
    expected = {  # view: kNN top-1, kNN per-class accuracy, linear top-1 (12 or 11 queries)
        "fused": (5 / 12, [0.5, None, 0.25, 0.0, None, 0.0, None, 1.0], 6 / 12),
        "S1": (5 / 12, [1.0, None, 0.0, 0.0, None, 0.0, None, 1.0], 7 / 12),
        "S2 L2A": (4 / 11, [1.0, None, 0.25, 0.0, None, 0.0, None, 2 / 3], 8 / 11),
    }
    assert list(VIEWS) == list(expected)
    for view, (knn, per_class, linear) in expected.items():
        result = results["backbones"]["pretrained"][view]
        assert result["knn"]["top1"] == pytest.approx(knn), view
        assert result["knn"]["per_class"] == pytest.approx([*per_class, None, None, None]), view
        assert result["linear"]["top1"] == pytest.approx(linear), view
    assert json.loads((out / "results.json").read_text())["setup"] == results["setup"]

    readme = (out / "README.md").read_text()
    assert "| fused | kNN top-1 |" in readme
    for figure in FIGURES:
        assert f"]({figure})" in readme
        with Image.open(out / figure) as image:
            image.verify()
        with Image.open(out / figure) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert min(pixels.shape[:2]) >= 300
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn, not blank


def test_no_dual_centering_flag_selects_its_own_report_folder() -> None:
    default = parse_args([])
    assert (default.out, default.compare) == (
        Path("reports/demo"),
        Path("reports/demo-dino-centering"),
    )
    ablation = parse_args(["--no-dual-centering"])
    assert ablation.no_dual_centering
    assert (ablation.out, ablation.compare) == (
        Path("reports/demo-dino-centering"),
        Path("reports/demo"),
    )
