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
    assert results["setup"]["centering"] == "dual"
    assert results["setup"]["steps"] >= 1
    assert results["setup"]["heldout_tiles"] == 12  # val_fraction 0.25 of 48 tiles
    for name in ("pretrained", "random init"):
        for view in VIEWS:
            result = results["backbones"][name][view]
            for protocol in ("knn", "linear"):
                assert 0.0 <= result[protocol]["top1"] <= 1.0
            per_class = result["knn"]["per_class"]
            assert len(per_class) == 11
            support = results["setup"]["query_support"][view]
            assert [a is not None for a in per_class] == [n > 0 for n in support]
    # Every held-out tile has a dominant class and at least one modality: all enter the fused view.
    assert sum(results["setup"]["query_support"]["fused"]) == 12
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
