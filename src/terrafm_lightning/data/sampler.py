"""WorldCover-weighted, distributed, resumable sampling of store tiles.

Tile weight (inverse class frequency, tempered)::

    w_i = sum_c h_ic * f_c ** (-tau)

``h_ic`` is tile i's WorldCover histogram (shares over the 11 classes, summing to 1 over its valid
pixels), ``f_c`` the store-wide frequency of class c and ``tau`` the tempering exponent: ``tau = 0``
samples tiles uniformly, ``tau = 1`` makes every class equally likely in expectation (full inverse
frequency). Classes absent from the store (``f_c = 0``) contribute nothing; a tile without any
valid WorldCover pixel gets weight 1, the weight every tile has at ``tau = 0``.

All ranks share one with-replacement stream drawn from a generator seeded by ``(seed, epoch)``
and rank r keeps positions r, r + R, r + 2R, ... of it, so the ranks' shares are disjoint, equally
long and together are exactly the stream a single process would draw. Draws are independent over
the whole dataset, so every batch mixes tiles from as many chunks/shards as it has samples.

The stream is ``Generator.choice(N, size, p=p)`` of numpy, bit for bit, but built per rank: numpy
maps uniforms through the cumulative distribution (``cdf = p.cumsum(); cdf /= cdf[-1]``, then
``searchsorted(uniforms, side="right")``). The CDF is computed once and cached; each rank draws the
epoch's uniforms (a fast sequential fill, chunk by chunk) and looks up only its own positions.

The lookup is a bucket table rather than numpy's binary search, whose ~23 dependent random reads
per draw into a 50 MB CDF made one rank's whole share cost seconds at 6.1M tiles. ``[0, 1)`` is cut
into ``K`` equal buckets (``K`` a power of two, so ``u * K`` and ``cdf * K`` are exact) and
``start[k]`` counts the CDF entries below ``k / K``: a draw ``u`` in bucket ``k`` is ``start[k]``
plus the bucket's entries ``<= u``, about one on average, found by stepping forward (a bucket
crowded by many zero weights falls back to the binary search). It counts what ``searchsorted``
counts, so the stream is unchanged; ``benchmarks/sampler_scale.py`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from terrafm_lightning.errors import UserError

UNIFORM_CHUNK = 16384
"""Uniforms of one rank drawn per chunk (the chunk holds ``num_replicas`` times as many)."""
SEARCH_CHUNK = 1 << 18
"""Draws looked up per pass, so that the pass's temporaries stay in cache."""
BUCKET_STEPS = 16
"""Forward steps inside a bucket before the remaining draws use the binary search."""


def worldcover_tile_weights(
    histograms: np.ndarray, class_frequencies: Sequence[float], tau: float
) -> np.ndarray:
    """Per-tile sampling weights ``w_i = sum_c h_ic * f_c ** (-tau)`` (see the module docstring).

    Args:
        histograms: (N, K) WorldCover class shares per tile.
        class_frequencies: (K,) store-wide class frequencies in the same class order.
        tau: tempering exponent, >= 0.

    Returns:
        (N,) float64 weights, all > 0.
    """
    hist = np.asarray(histograms, dtype=np.float64)
    freq = np.asarray(class_frequencies, dtype=np.float64)
    if hist.ndim != 2 or hist.shape[1] != freq.shape[0]:
        raise UserError(
            f"histograms of shape {hist.shape} do not match {freq.shape[0]} class frequencies"
        )
    if tau < 0:
        raise UserError(f"tau must be >= 0, got {tau}")
    if not np.isfinite(hist).all() or (hist < 0).any():
        raise UserError("WorldCover histograms must be finite and non-negative")
    present = freq > 0
    class_weight = np.zeros_like(freq)
    class_weight[present] = freq[present] ** (-tau)
    weights = hist @ class_weight
    weights[hist[:, present].sum(axis=1) <= 0] = 1.0
    return weights


class WorldCoverWeightedSampler(DistributedSampler):
    """Weighted with-replacement sampler whose ranks split one ``(seed, epoch)`` stream.

    It subclasses :class:`~torch.utils.data.DistributedSampler` so that Lightning (and anything
    else that checks for a distributed sampler) keeps it instead of wrapping it in a second
    distributed sampler; Lightning calls :meth:`set_epoch` at every epoch.

    Args:
        weights: (N,) non-negative per-tile weights (:func:`worldcover_tile_weights`); the sampler
            yields positions 0..N-1 into them.
        samples_per_epoch: draws per epoch over all ranks (default N), rounded up to a multiple
            of the number of ranks so every rank gets the same count (:attr:`num_samples` each).
        num_replicas: number of ranks (default: the process group's world size, else 1).
        rank: this rank (default: the process group's rank, else 0).
        seed: base seed shared by all ranks.
    """

    def __init__(
        self,
        weights: Sequence[float] | np.ndarray,
        samples_per_epoch: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        probabilities = np.asarray(weights, dtype=np.float64)
        if probabilities.ndim != 1 or probabilities.size == 0:
            raise UserError("weights must be a non-empty 1-D sequence")
        if not np.isfinite(probabilities).all() or (probabilities < 0).any():
            raise UserError("weights must be finite and non-negative")
        if probabilities.sum() <= 0:
            raise UserError("at least one weight must be positive")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        total = probabilities.size if samples_per_epoch is None else samples_per_epoch
        if total <= 0:
            raise UserError(f"samples_per_epoch must be positive, got {total}")
        # DistributedSampler's own bookkeeping (num_samples, total_size) is replaced below.
        super().__init__(range(probabilities.size), num_replicas=num_replicas, rank=rank, seed=seed)
        self.probabilities = probabilities / probabilities.sum()
        # Exactly the operations of numpy's Generator.choice, so draws are bit-identical to it.
        self._cdf = self.probabilities.cumsum()
        self._cdf /= self._cdf[-1]
        # K: the power of two in (N, 2N]: under one CDF entry per bucket, at most the CDF's memory.
        self._buckets = 1 << probabilities.size.bit_length()
        counts = np.bincount((self._cdf * self._buckets).astype(np.intp), minlength=self._buckets)
        index = np.int32 if probabilities.size < 2**31 else np.int64
        self._bucket_start = np.zeros(self._buckets, index)
        np.cumsum(counts[: self._buckets - 1], out=self._bucket_start[1:])
        self.num_samples = math.ceil(total / num_replicas)
        self.total_size = self.num_samples * num_replicas
        self.position = 0
        self._resume_epoch: int | None = None
        self._resume_position = 0

    def _uniforms(self, epoch: int, first: int, step: int) -> np.ndarray:
        """The epoch generator's uniforms at stream positions ``first, first + step, ...``.

        Drawn in chunks of a multiple of ``step`` that stay in cache (the same values as one
        ``random(total_size)`` call: each double takes the next 64-bit draw), without the
        whole stream in memory.
        """
        rng = np.random.default_rng([self.seed, epoch])
        offset, skip = first % step, first // step
        out = np.empty(len(range(first, self.total_size, step)))
        buffer = np.empty(step * UNIFORM_CHUNK)
        seen = 0  # positions offset + j * step with j < seen were drawn
        for start in range(0, self.total_size, len(buffer)):
            size = min(len(buffer), self.total_size - start)
            rng.random(out=buffer[:size])
            part = buffer[offset:size:step]
            drop = min(max(0, skip - seen), len(part))
            out[seen + drop - skip : seen + len(part) - skip] = part[drop:]
            seen += len(part)
        return out

    def _draws(self, epoch: int, first: int, step: int) -> np.ndarray:
        """Stream positions ``first, first + step, ...`` of ``epoch`` as sample positions."""
        uniforms = self._uniforms(epoch, first, step)
        draws = np.empty(len(uniforms), np.int64)
        for start in range(0, len(uniforms), SEARCH_CHUNK):
            part = slice(start, start + SEARCH_CHUNK)
            draws[part] = self._search(uniforms[part])
        return draws

    def _search(self, uniforms: np.ndarray) -> np.ndarray:
        """``self._cdf.searchsorted(uniforms, side="right")`` through the bucket table."""
        cdf = self._cdf
        found = self._bucket_start[(uniforms * self._buckets).astype(np.intp)].astype(np.intp)
        # cdf[-1] == 1 > u, so no step leaves the array.
        ahead = cdf[found] <= uniforms
        found += ahead
        open_ = np.flatnonzero(ahead)
        for _ in range(BUCKET_STEPS - 1):
            if not open_.size:
                return found
            ahead = cdf[found[open_]] <= uniforms[open_]
            found[open_] += ahead
            open_ = open_[ahead]
        if open_.size:
            found[open_] = cdf.searchsorted(uniforms[open_], side="right")
        return found

    def stream(self, epoch: int) -> np.ndarray:
        """The full stream of draws of ``epoch``, identical on every rank."""
        return self._draws(epoch, 0, 1)

    def share(self, epoch: int, start: int = 0) -> np.ndarray:
        """This rank's draws of ``epoch`` from position ``start`` of its share on."""
        return self._draws(epoch, self.rank + start * self.num_replicas, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        start = self._resume_position if self._resume_epoch == self.epoch else 0
        self._resume_epoch, self._resume_position = None, 0
        share = self.share(self.epoch, start)
        for position, draw in enumerate(share.tolist(), start):
            self.position = position + 1  # samples handed out so far, this one included
            yield draw

    def __len__(self) -> int:
        """Draws per epoch on this rank (the full count, also when resuming mid-epoch)."""
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's stream; a new epoch starts at position 0."""
        if epoch != self.epoch:
            self.position = 0
        super().set_epoch(epoch)

    def state_dict(self, position: int | None = None) -> dict[str, Any]:
        """Resume state: seed, epoch, rank count and this rank's position in its share.

        Args:
            position: override the position; the datamodule passes the number of samples the
                model consumed, because DataLoader prefetching runs the sampler ahead of training.
        """
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position if position is None else position,
            "num_replicas": self.num_replicas,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next iteration of ``state["epoch"]`` continue at ``state["position"]``."""
        mismatched = {
            key: (state[key], getattr(self, key))
            for key in ("seed", "num_replicas", "num_samples")
            if key in state and state[key] != getattr(self, key)
        }
        if mismatched:
            raise UserError(
                "cannot resume the sampler: saved vs current settings differ: "
                + ", ".join(f"{k}={saved} vs {now}" for k, (saved, now) in mismatched.items())
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._resume_epoch, self._resume_position = self.epoch, self.position
