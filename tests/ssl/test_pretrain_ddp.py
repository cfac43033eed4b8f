"""Real 2-process DDP (gloo on CPU): dual centring vs one process, and the CLI lifecycle
(SIGKILL and resume, validate, predict) against one process / an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from tests.conftest import run_rank_script
from tests.generators.configs import tiny_config
from tests.generators.stores import make_synthetic_store
from tests.test_cli import metric_rows, step_losses, wait_for_checkpoint


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


def _ddp_config(store: Path, out: Path, devices: int) -> Path:
    strategy = {"strategy": "ddp", "devices": 2} if devices == 2 else {"devices": 1}
    return tiny_config(store, out, **strategy)


def cli_process(*args: str) -> subprocess.Popen:
    """``python -m terrafm_lightning ARGS`` in its own session (DDP ranks included)."""
    return subprocess.Popen(
        [sys.executable, "-m", "terrafm_lightning", *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err.decode()[-4000:]


def _val_metrics(out: Path) -> dict[str, float]:
    rows = [r for r in metric_rows(out) if r.get("val/knn_top1")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


@pytest.mark.slow
def test_ddp_sigkill_resume_validate_and_predict_through_the_cli(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "store.zarr", 32, 64)
    # Uninterrupted 2-process DDP reference.
    ref = tmp_path / "ref"
    finish(cli_process("fit", "--config", str(_ddp_config(store, ref, 2))))
    ref_last = ref / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    reference = step_losses(ref)
    assert len(reference) == 6  # 48 samples / (2 ranks x 8) per epoch, 2 epochs

    # The same run, SIGKILLed mid-epoch 2 (rank 0; rank 1 then stops on its own), resumed.
    run = tmp_path / "killed"
    config = _ddp_config(store, run, 2)
    proc = cli_process("fit", "--config", str(config))
    last = run / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 4 <= resumed_from < 6
    finish(cli_process("fit", "--config", str(config), "--ckpt_path", str(last)))
    resumed = {s: v for s, v in step_losses(run).items() if s >= resumed_from}
    assert resumed == pytest.approx({s: v for s, v in reference.items() if s >= resumed_from})
    final = torch.load(run / "runs" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)[
        "state_dict"
    ]
    for key, value in torch.load(ref_last, weights_only=True)["state_dict"].items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)

    # Validation: 2 processes give the metrics of 1.
    metrics = {}
    for devices in (1, 2):
        out = tmp_path / f"validate{devices}"
        args = ["validate", "--config", str(_ddp_config(store, out, devices))]
        finish(cli_process(*args, "--ckpt_path", str(ref_last)))
        metrics[devices] = _val_metrics(out)
    assert metrics[1].keys() == {"val/loss", "val/knn_top1", "val/knn_rare_top1"}
    assert metrics[2] == pytest.approx(metrics[1], rel=1e-5)

    # Prediction: each rank writes its own rows, together every usable tile once.
    embeddings = {}
    for devices in (1, 2):
        output = tmp_path / f"embeddings{devices}.zarr"
        out = tmp_path / f"predict{devices}"
        config = yaml.safe_load(_ddp_config(store, out, devices).read_text())
        config["trainer"]["callbacks"].append(
            {"class_path": "EmbeddingWriter", "init_args": {"output": str(output), "chunk": 4}}
        )
        (out / "predict.yaml").write_text(yaml.safe_dump(config))
        finish(
            cli_process(
                "predict", "--config", str(out / "predict.yaml"), "--ckpt_path", str(ref_last)
            )
        )
        embeddings[devices] = xr.open_zarr(output)
    np.testing.assert_array_equal(embeddings[2]["written"], embeddings[1]["written"])
    assert embeddings[1]["written"].values.sum() >= 30
    np.testing.assert_allclose(embeddings[2]["cls"], embeddings[1]["cls"], rtol=1e-4, atol=1e-5)
