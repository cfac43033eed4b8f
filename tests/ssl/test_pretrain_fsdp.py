"""FSDP2 sharding (``configure_model``) under real 2-process ``ModelParallelStrategy`` on CPU.

Lightning's ``ModelParallelStrategy`` runs on ``accelerator="cpu"`` with gloo, so the real
wiring is exercised: both ranks train on halves of fixed global batches and are compared with
one unsharded process on the whole batches.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.conftest import run_rank_script
from tests.generators.configs import tiny_config
from tests.generators.stores import make_synthetic_store
from tests.ssl.test_pretrain_ddp import cli_process, finish
from tests.test_cli import step_losses, wait_for_checkpoint

MOMENTUM = 0.9  # the script's momentum_teacher: the EMA momentum at optimizer step 0
PEAK_LR = 5e-4  # the script's peak learning rate (per 256 samples, at its global batch)


@pytest.mark.slow
def test_fsdp_shards_student_and_teacher_and_matches_one_process(tmp_path: Path) -> None:
    run_rank_script("fsdp_pretrain_run.py", tmp_path, 2)
    run_rank_script("fsdp_pretrain_run.py", tmp_path, 1)
    rank0, rank1, single = (
        torch.load(tmp_path / name, weights_only=True)
        for name in ("devices2_rank0.pt", "devices2_rank1.pt", "devices1_rank0.pt")
    )
    assert len(rank0) == len(rank1) == len(single) == 4  # before training + 3 steps

    # (1) Every parameter of both networks is a DTensor shard; the ranks split each one.
    for net in ("student", "teacher"):
        layout0, layout1 = rank0[-1][f"{net}_layout"], rank1[-1][f"{net}_layout"]
        assert any(".blocks.1." in name for name in layout0)
        for name, (dtensor0, local0, full) in layout0.items():
            dtensor1, local1, _ = layout1[name]
            assert dtensor0 and dtensor1, f"{net}.{name} is not sharded"
            assert local0 + local1 == full, f"{net}.{name}: shards {local0} + {local1} != {full}"
        share = sum(v[1] for v in layout0.values()) / sum(v[2] for v in layout0.values())
        assert 0.45 < share < 0.55, f"{net}: rank 0 holds {share:.1%} of the parameters"
        # The reference run is unsharded.
        assert not any(v[0] for v in single[-1][f"{net}_layout"].values())
    assert rank0[-1]["teacher_layout"] == rank0[-1]["student_layout"]

    # (2) The sharded EMA: teacher = m * teacher + (1 - m) * student on the gathered parameters
    # at the first step (momentum schedule value m at step 0), and the teacher follows the
    # unsharded run over all steps.
    before, after = rank0[0], rank0[1]
    for name, teacher in after["teacher"].items():
        expected = MOMENTUM * before["teacher"][name] + (1 - MOMENTUM) * after["student"][name]
        torch.testing.assert_close(teacher, expected, rtol=1e-5, atol=1e-7)
    moved = max((after["teacher"][k] - before["teacher"][k]).abs().max() for k in before["teacher"])
    assert moved > 1e-5, "the teacher did not move"
    for step, (sharded, reference) in enumerate(zip(rank0, single, strict=True)):
        # Reduction order differs between the sharded and the single run. Adam's first steps turn
        # that noise on a near-zero gradient into an update of up to +-lr, so a few weights may
        # differ by up to 2 lr in the student, (1 - momentum) 2 lr in the teacher; all others
        # agree to 1e-5 (a sharding error moves far more than 1e-4 of the weights).
        off = total = 0
        for name, value in reference["teacher"].items():
            diff = (sharded["teacher"][name] - value).abs()
            assert diff.max() <= (1 - MOMENTUM) * 2 * PEAK_LR, f"step {step} {name}: {diff.max()}"
            off += int((diff > 1e-5 + 1e-4 * value.abs()).sum())
            total += value.numel()
        assert off <= 1e-4 * total, f"step {step}: {off} of {total} teacher weights differ"

    # (3) The centres are identical on both ranks and equal those of the unsharded run.
    for step, (a, b, s) in enumerate(zip(rank0, rank1, single, strict=True)):
        for key in ("c", "c_h"):
            assert torch.equal(a[key], b[key]), f"step {step}: {key} differs between ranks"
            torch.testing.assert_close(a[key], s[key], rtol=1e-4, atol=1e-6)
    assert rank0[-1]["c"].abs().sum() > 0 and rank0[-1]["c_h"].abs().sum() > 0


@pytest.mark.slow
def test_fsdp2_distributed_checkpoint_resume_through_the_cli(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "store.zarr", 32, 64)
    strategy = {
        "class_path": "ModelParallelStrategy",
        "init_args": {
            "data_parallel_size": 2,
            "tensor_parallel_size": 1,
            "process_group_backend": "gloo",
            "save_distributed_checkpoint": True,
        },
    }
    configs = {
        name: tiny_config(store, tmp_path / name, strategy=strategy, devices=2)
        for name in ("ref", "killed")
    }
    finish(cli_process("fit", "--config", str(configs["ref"])))
    reference = step_losses(tmp_path / "ref")
    assert len(reference) == 6
    run = tmp_path / "killed"
    proc = cli_process("fit", "--config", str(configs["killed"]))
    last = run / "runs" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last, min_step=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.is_dir()  # a distributed checkpoint: one shard file per rank
    resumed_from = torch.load(last / "meta.pt", weights_only=True)["global_step"]
    assert 4 <= resumed_from < 6
    finish(cli_process("fit", "--config", str(configs["killed"]), "--ckpt_path", str(last)))
    resumed = {s: v for s, v in step_losses(run).items() if s >= resumed_from}
    assert resumed == pytest.approx({s: v for s, v in reference.items() if s >= resumed_from})

    def final_state(root: Path, version: int) -> dict[str, torch.Tensor]:
        folder = root / "runs" / f"version_{version}" / "checkpoints"
        dcp_to_torch_save(folder / "last.ckpt", folder / "last.pt")
        return torch.load(folder / "last.pt", weights_only=True)["state_dict"]

    final, expected = final_state(run, 1), final_state(tmp_path / "ref", 0)
    assert {k.split(".")[0] for k in expected} >= {"student", "teacher"}
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=1e-5, atol=1e-6, msg=key)
