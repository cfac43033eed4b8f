from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from terrafm_lightning.data.sampler import WorldCoverWeightedSampler, worldcover_tile_weights
from tests.conftest import free_port


def _weights(n: int = 50) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.uniform(0.1, 5.0, size=n)


def test_weights_follow_tempered_inverse_frequency() -> None:
    freq = np.array([0.7, 0.25, 0.05, 0.0])
    hist = np.array(
        [
            [1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.5, 0.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # no valid WorldCover pixel
        ]
    )
    w = worldcover_tile_weights(hist, freq, tau=0.5)
    np.testing.assert_allclose(w[:3], [0.7**-0.5, 0.05**-0.5, 0.5 * 0.7**-0.5 + 0.5 * 0.25**-0.5])
    assert w[3] == 1.0
    np.testing.assert_allclose(worldcover_tile_weights(hist[:3], freq, tau=0.0), 1.0)
    # tau = 1 balances classes: a tile of the rare class is 14x as likely as one of the common.
    w1 = worldcover_tile_weights(hist, freq, tau=1.0)
    assert w1[1] / w1[0] == pytest.approx(14.0)
    with pytest.raises(ValueError, match="do not match"):
        worldcover_tile_weights(hist, freq[:3], tau=0.5)


def test_draws_follow_weights() -> None:
    weights = np.array([1.0, 2.0, 7.0, 0.0])
    sampler = WorldCoverWeightedSampler(weights, samples_per_epoch=20_000, seed=3)
    counts = np.bincount(list(sampler), minlength=4) / 20_000
    np.testing.assert_allclose(counts, weights / weights.sum(), atol=0.015)
    assert counts[3] == 0


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_partition_one_stream_with_equal_lengths(world: int) -> None:
    weights = _weights(50)
    samplers = [
        WorldCoverWeightedSampler(weights, 101, num_replicas=world, rank=r, seed=7)
        for r in range(world)
    ]
    shares = [list(s) for s in samplers]
    per_rank = -(-101 // world)
    assert all(len(share) == len(s) == per_rank for share, s in zip(shares, samplers, strict=True))
    stream = samplers[0].stream(0)
    assert len(stream) == per_rank * world
    # Interleaved rank shares give back the single stream: disjoint positions covering it.
    interleaved = np.stack(shares, axis=1).reshape(-1)
    np.testing.assert_array_equal(interleaved, stream)
    single = WorldCoverWeightedSampler(weights, samples_per_epoch=per_rank * world, seed=7)
    np.testing.assert_array_equal(list(single), stream)


def test_epochs_and_seeds_change_the_stream_deterministically() -> None:
    sampler = WorldCoverWeightedSampler(_weights(), seed=0)
    first = list(sampler)
    assert list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    other = WorldCoverWeightedSampler(_weights(), seed=0)
    other.set_epoch(1)
    assert list(other) == second
    assert list(WorldCoverWeightedSampler(_weights(), seed=1)) != first


def test_resume_mid_epoch_on_several_ranks() -> None:
    weights = _weights()
    for rank in range(3):
        sampler = WorldCoverWeightedSampler(weights, 90, num_replicas=3, rank=rank, seed=5)
        sampler.set_epoch(2)
        full = list(sampler)
        sampler.set_epoch(2)
        iterator = iter(sampler)
        head = [next(iterator) for _ in range(11)]
        state = sampler.state_dict()
        assert state["position"] == 11 and state["epoch"] == 2
        resumed = WorldCoverWeightedSampler(weights, 90, num_replicas=3, rank=rank, seed=5)
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # Lightning calls this again with the restored epoch
        assert len(resumed) == 30  # the full length: Lightning counts the restored batches
        assert head + list(resumed) == full
        # The resume offset applies once; the next epoch starts from its beginning.
        resumed.set_epoch(3)
        assert len(list(resumed)) == 30
    mismatched = WorldCoverWeightedSampler(weights, samples_per_epoch=90, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="num_replicas=3 vs 2"):
        mismatched.load_state_dict(state)


def test_batches_mix_many_chunks() -> None:
    # 1000 tiles stored 10 per chunk: a batch of 32 i.i.d. draws touches ~30 distinct chunks.
    sampler = WorldCoverWeightedSampler(np.ones(1000), seed=0)
    draws = np.array(list(sampler))
    chunks_per_batch = [len(set(batch // 10)) for batch in draws[: 32 * 30].reshape(30, 32)]
    assert np.mean(chunks_per_batch) > 25


class _IndexRecorder(pl.LightningModule):
    """Records the sample indices of every training batch and the loader's sampler."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen += batch[0].tolist()
        return self.layer(batch[0].float().view(-1, 1)).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # What a launcher (torchrun, SLURM) sets: Lightning joins the group instead of spawning.
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    # Ranks given explicitly, as TerraFMDataModule does from the trainer (no group exists yet).
    sampler = WorldCoverWeightedSampler(_weights(), 48, num_replicas=world, rank=rank, seed=3)
    dataset = torch.utils.data.TensorDataset(torch.arange(50))
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=4)
    model = _IndexRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    kept = trainer.train_dataloader.sampler
    result = {"kept": kept is sampler, "seen": model.seen, "share": list(sampler)}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_is_a_distributed_sampler_so_lightning_keeps_it(tmp_path: Path) -> None:
    """Under a real 2-rank DDP Trainer, Lightning trains on the sampler as given (not wrapped)."""
    mp.spawn(_trainer_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    reference = WorldCoverWeightedSampler(_weights(), samples_per_epoch=48, seed=3)
    stream = reference.stream(0)
    for rank, result in enumerate(results):
        assert result["kept"]
        assert result["seen"] == result["share"] == stream[rank::2].tolist()
    assert isinstance(reference, DistributedSampler)


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        weights = np.arange(1, 41, dtype=float)
        sampler = WorldCoverWeightedSampler(weights, samples_per_epoch=64, seed=11)
        sampler.set_epoch(4)
        share = list(sampler)
        # Resume this rank mid-epoch from its own state.
        sampler.set_epoch(4)
        iterator = iter(sampler)
        head = [next(iterator) for _ in range(5 + rank)]
        resumed = WorldCoverWeightedSampler(weights, samples_per_epoch=64, seed=11)
        resumed.load_state_dict(sampler.state_dict())
        resumed.set_epoch(4)
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, {"share": share, "resumed": head + list(resumed)})
        if rank == 0:
            result = {"gathered": gathered, "world": dist.get_world_size()}
            Path(out_dir, "result.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run(tmp_path: Path) -> None:
    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2
    shares = [g["share"] for g in result["gathered"]]
    assert len(shares[0]) == len(shares[1]) == 32
    reference = WorldCoverWeightedSampler(np.arange(1, 41, dtype=float), 64, 2, 0, seed=11)
    stream = reference.stream(4)
    np.testing.assert_array_equal(np.stack(shares, axis=1).reshape(-1), stream)
    assert [g["resumed"] for g in result["gathered"]] == shares
