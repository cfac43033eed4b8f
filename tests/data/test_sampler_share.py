"""The per-rank share is today's stream (numpy ``Generator.choice``) bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from terrafm_lightning.data.sampler import WorldCoverWeightedSampler


@pytest.mark.parametrize("n", [1, 7, 1000, 50_000])
@pytest.mark.parametrize("world", [1, 3, 8])
def test_share_equals_numpy_choice_stream(n: int, world: int) -> None:
    rng = np.random.default_rng(n)
    weights = rng.uniform(0, 5, n) * (rng.random(n) > 0.2)  # with zero weights
    weights[0] = max(weights[0], 0.5)
    total = 3 * n + 5
    p = weights / weights.sum()
    for epoch in (0, 4):
        stream = np.random.default_rng([11, epoch]).choice(n, size=-(-total // world) * world, p=p)
        for rank in range(world):
            sampler = WorldCoverWeightedSampler(weights, total, world, rank, seed=11)
            share = sampler.share(epoch)
            assert share.dtype == np.int64
            np.testing.assert_array_equal(share, stream[rank::world])
            np.testing.assert_array_equal(sampler.share(epoch, 5), stream[rank::world][5:])
        np.testing.assert_array_equal(sampler.stream(epoch), stream)


def test_share_equals_numpy_choice_with_crowded_buckets() -> None:
    """Long runs of zero weights and vastly different weights still give numpy's stream.

    Thousands of zero weights put one CDF value into one bucket many times over (the binary
    search fallback), and a few heavy tiles leave most buckets empty.
    """
    rng = np.random.default_rng(3)
    weights = rng.lognormal(0.0, 4.0, 20_000)
    weights[5_000:12_000] = 0.0
    weights[::997] *= 1e9
    p = weights / weights.sum()
    stream = np.random.default_rng([2, 1]).choice(weights.size, size=60_000, p=p)
    sampler = WorldCoverWeightedSampler(weights, 60_000, 1, 0, seed=2)
    np.testing.assert_array_equal(sampler.share(1), stream)
