"""Frozen features: one extractor for ``eval/`` and ``demo/``, computed once per split and cached.

Probes on frozen features (kNN, the linear probe of :func:`linear_probe_on_features`) need
each split's features only once: :func:`split_features` extracts them and, given a cache
folder, saves them so that other protocols, seeds and reruns load them instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from terrafm_lightning.modalities import MODALITIES

log = logging.getLogger(__name__)


class SplitFeatures(NamedTuple):
    """CLS features (N, d) and labels of one split, on the CPU."""

    features: Tensor
    labels: Tensor


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    device: torch.device | str = "cpu",
    desc: str | None = None,
) -> SplitFeatures:
    """CLS features and labels of every batch; the backbone is put in eval mode meanwhile.

    A batch holds modality tensors, ``label`` and optionally ``presence`` ((B, 3) bool, the
    modalities each row uses; default: every given modality in every row).

    Args:
        backbone: a TerraFM backbone (``backbone(inputs, presence) -> (B, d)``).
        batches: evaluation batches.
        device: where the backbone runs.
        desc: progress-bar title (None: no bar).
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    for batch in tqdm(batches, desc=desc, disable=desc is None, leave=False):
        inputs = {m: batch[m].to(device) for m in MODALITIES if m in batch}
        presence = batch.get("presence")
        presence = presence.to(device) if presence is not None else None
        features.append(backbone(inputs, presence).float().cpu())
        labels.append(batch["label"])
    backbone.train(was_training)
    if not features:
        raise ValueError("no batches to extract features from (empty dataset?)")
    return SplitFeatures(torch.cat(features), torch.cat(labels))


def split_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    cache: Path | None = None,
    desc: str | None = None,
) -> SplitFeatures:
    """Frozen features of a dataset, loaded from ``cache`` (a ``.pt`` file) when it exists.

    The cache is written after the first extraction; it belongs to one backbone and dataset,
    so name it after both (``make eval`` uses ``<out>/features/<source>/<dataset>/<split>.pt``).
    """
    if cache is not None and cache.is_file():
        cached = torch.load(cache, weights_only=True)
        log.info("features from cache %s", cache)
        return SplitFeatures(cached["features"], cached["labels"])
    result = extract_features(
        backbone, DataLoader(dataset, batch_size=batch_size), device, desc=desc
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result._asdict(), cache)
    return result
