"""Dual centring under real 2-process DDP (gloo on CPU) vs one process on the same batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_rank_script


@pytest.mark.slow
def test_centres_identical_on_ranks_and_equal_to_single_process(tmp_path: Path) -> None:
    run_rank_script("ddp_centering_run.py", tmp_path, 2)
    run_rank_script("ddp_centering_run.py", tmp_path, 1)
    rank0, rank1, single = (
        torch.load(tmp_path / name, weights_only=True)
        for name in ("devices2_rank0.pt", "devices2_rank1.pt", "devices1_rank0.pt")
    )
    assert len(rank0) == len(rank1) == len(single) == 3
    for step, (a, b, s) in enumerate(zip(rank0, rank1, single, strict=True)):
        for key in ("c", "c_h"):
            assert torch.equal(a[key], b[key]), f"step {step}: {key} differs between ranks"
            torch.testing.assert_close(a[key], s[key], rtol=1e-4, atol=1e-6)
    # Step 0: rank 1 had no high-frequency sample, yet c_h moved (rank 0 had some).
    assert single[0]["c_h"].abs().sum() > 0
    # Step 2: no high-frequency sample anywhere -> c_h unchanged, c updated.
    torch.testing.assert_close(rank0[2]["c_h"], rank0[1]["c_h"], rtol=0, atol=0)
    assert not torch.equal(rank0[2]["c"], rank0[1]["c"])
