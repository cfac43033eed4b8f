"""Frozen features: one extractor for ``eval/`` and ``demo/``, computed once per split and cached.

Probes on frozen features (kNN, the linear probe of :func:`linear_probe_on_features`) need
each split's features only once: :func:`split_features` extracts them and, given a
:class:`FeatureCache`, saves them so that other protocols, seeds and reruns load them instead.
A cache entry is keyed by what made it (:func:`cache_key`): a digest of the backbone's weights
as loaded, its architecture, the dataset root, the split's samples (or the files defining it)
and the preprocessing settings. Another key means recompute, never reuse.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

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


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_digest(dataset: Dataset) -> str:
    """SHA-256 of what defines a split: its sample keys, else the bytes of its ``sources``.

    Raises:
        TypeError: for a dataset with neither (its features cannot be keyed, so not cached).
    """
    digest = hashlib.sha256(f"n={len(dataset)}".encode())
    if hasattr(dataset, "keys"):
        digest.update("\n".join(map(str, dataset.keys)).encode())
    elif hasattr(dataset, "sources"):
        for source in dataset.sources:
            digest.update(f"{source}\n".encode() + Path(source).read_bytes())
    else:
        raise TypeError(f"{type(dataset).__name__}: no keys or sources to key features by")
    return digest.hexdigest()


def cache_key(
    weights: str, architecture: Mapping[str, Any], root: Path, split: str, dataset: Dataset,
    preprocessing: Mapping[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """What made a split's features: the fields a :class:`FeatureCache` entry must match."""
    return {
        "weights_sha256": weights,
        "architecture": dict(architecture),
        "root": str(Path(root).resolve()),
        "split": split,
        "split_sha256": dataset_digest(dataset),
        "preprocessing": dict(preprocessing),
    }


@dataclass
class FeatureCache:
    """Features on disk under ``folder/<digest of the key>/features.pt``, with their key.

    An entry is loaded only when its recorded key equals the requested one; ``reused`` and
    ``computed`` count the splits loaded and extracted.
    """

    folder: Path
    reused: int = 0
    computed: int = 0

    def path(self, key: Mapping[str, Any]) -> Path:
        """The entry file of ``key``."""
        text = json.dumps(key, sort_keys=True, default=str)
        return self.folder / hashlib.sha256(text.encode()).hexdigest()[:16] / "features.pt"

    def load(self, key: Mapping[str, Any]) -> SplitFeatures | None:
        """The entry of ``key`` if present and recorded with the same key, else None."""
        path = self.path(key)
        if not path.is_file():
            return None
        cached = torch.load(path, weights_only=True)
        if json.loads(cached.get("key", "null")) != json.loads(json.dumps(key, default=str)):
            return None
        self.reused += 1
        log.info("features from cache %s", path)
        return SplitFeatures(cached["features"], cached["labels"])

    def save(self, key: Mapping[str, Any], features: SplitFeatures) -> None:
        """Write an entry (atomically: a partial file never has the final name)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        payload = {"key": json.dumps(key, sort_keys=True, default=str), **features._asdict()}
        torch.save(payload, tmp)
        tmp.replace(path)
        self.computed += 1


def split_features(
    backbone: nn.Module,
    dataset: Dataset,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    cache: FeatureCache | None = None,
    key: Mapping[str, Any] | None = None,
    desc: str | None = None,
) -> SplitFeatures:
    """Frozen features of a dataset, from ``cache`` when it holds an entry made the same way.

    Args:
        backbone: the frozen backbone.
        dataset: the split.
        batch_size: extraction batch size.
        device: where the backbone runs.
        cache: where to look up and save the features (None: always extract).
        key: what made them (:func:`cache_key`); required with ``cache``.
        desc: progress-bar title.
    """
    if cache is not None:
        if key is None:
            raise ValueError("split_features: a cache needs the key of what made the features")
        cached = cache.load(key)
        if cached is not None:
            return cached
    result = extract_features(
        backbone, DataLoader(dataset, batch_size=batch_size), device, desc=desc
    )
    if cache is not None:
        cache.save(key, result)
    return result
