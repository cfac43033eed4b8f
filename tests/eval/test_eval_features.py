import shutil

import pytest
import torch
from torch import nn

from terrafm_lightning.eval.datasets.base import AdaptedDataset, SampleDataset
from terrafm_lightning.eval.features import (
    FeatureCache,
    SplitFeatures,
    cache_key,
    dataset_digest,
    split_features,
    weights_digest,
)


class MeanBackbone(nn.Module):
    """Features = the per-channel mean of the s1 image times a weight (counts its calls)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.calls = 0

    def forward(self, inputs, presence=None):
        self.calls += 1
        return inputs["s1"].mean(dim=(-2, -1)) * self.scale


def sample(i):
    return {"s1": torch.full((2, 4, 4), float(i)), "label": torch.tensor(i % 2)}


def test_weights_digest_follows_every_tensor():
    a, b = MeanBackbone(1.0), MeanBackbone(1.0)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.scale += 1e-6
    assert weights_digest(a) != weights_digest(b)


def test_dataset_digest_follows_keys_or_split_files(tmp_path):
    assert dataset_digest(SampleDataset([1, 2], sample)) == dataset_digest(
        SampleDataset([1, 2], sample)
    )
    assert dataset_digest(SampleDataset([1, 2], sample)) != dataset_digest(
        SampleDataset([1, 3], sample)
    )
    split = tmp_path / "train.txt"
    split.write_text("a\nb\n")
    adapted = AdaptedDataset(SampleDataset([1, 2], sample), dict, [split])
    before = dataset_digest(adapted)
    split.write_text("a\nc\n")
    assert dataset_digest(adapted) != before
    with pytest.raises(TypeError, match="no keys or sources"):
        dataset_digest(torch.utils.data.TensorDataset(torch.zeros(2)))


def test_cache_reuses_only_the_same_key(tmp_path):
    dataset = SampleDataset(range(4), sample)
    cache = FeatureCache(tmp_path)
    preprocessing = {"img_size": None}

    def key(backbone, prep=preprocessing):
        return cache_key(weights_digest(backbone), {"backbone": "mean"}, tmp_path, "train",
                         dataset, prep)  # fmt: skip

    one, two = MeanBackbone(1.0), MeanBackbone(2.0)
    first = split_features(one, dataset, 2, cache=cache, key=key(one))
    assert torch.equal(first.features, torch.tensor([[0.0, 0], [1, 1], [2, 2], [3, 3]]))
    again = split_features(one, dataset, 2, cache=cache, key=key(one))
    assert torch.equal(again.features, first.features) and one.calls == 2  # two batches, once
    other = split_features(two, dataset, 2, cache=cache, key=key(two))
    assert torch.equal(other.features, 2 * first.features) and two.calls == 2
    split_features(one, dataset, 2, cache=cache, key=key(one, {"img_size": 32}))
    assert one.calls == 4  # other preprocessing: recomputed
    assert (cache.reused, cache.computed) == (1, 3)
    # An entry under another key's file name is never taken for it: its recorded key differs.
    target = cache.path(key(two, {"img_size": 64}))
    target.parent.mkdir(parents=True)
    shutil.copy(cache.path(key(one)), target)
    assert cache.load(key(two, {"img_size": 64})) is None
    with pytest.raises(ValueError, match="a cache needs the key"):
        split_features(one, dataset, cache=cache)


def test_split_features_without_a_cache_extracts():
    features = split_features(MeanBackbone(1.0), SampleDataset(range(3), sample), 2)
    assert isinstance(features, SplitFeatures)
    assert features.features.tolist() == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    assert features.labels.tolist() == [0, 1, 0]
