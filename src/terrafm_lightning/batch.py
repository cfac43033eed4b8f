"""Typed batch contracts: every dict that crosses a boundary between the package's parts.

One name per concept: ``available`` is what a tile has (store metadata, after the datamodule's
modality selection), ``presence`` is what a crop or view uses (a subset of ``available``). Both are
(B, 3) bool masks in :data:`terrafm_lightning.modalities.MODALITIES` column order. The modality
selection (``TerraFMDataModule(modalities=...)``) is applied once, in the CPU reader, so
``available`` never marks a modality outside it. ``docs/contracts.md`` describes the flow.
:func:`require` checks mask values without a host synchronisation.
"""

from collections.abc import Callable
from typing import Required, TypedDict

import torch
from torch import Tensor

#: modality key -> image tensor (B, C, H, W); keys are a subset of ``MODALITIES``.
ModalityImages = dict[str, Tensor]


class ModalityTensors(TypedDict, total=False):
    """One optional (B, C, H, W) tensor per modality key (the keys of ``MODALITIES``)."""

    s1: Tensor
    s2_l1c: Tensor
    s2_l2a: Tensor


class TileMetadata(TypedDict):
    """Per-tile fields every pretraining-side batch carries through unchanged."""

    available: Tensor
    """(B, 3) bool: modalities the tile has, restricted to the selected modalities."""
    dominant_class: Tensor
    """(B,) int64 WorldCover code of the tile's most common class (the kNN label)."""
    worldcover_hist: Tensor
    """(B, 11) float32 class shares in ``WORLDCOVER_CLASSES`` order."""
    index: Tensor
    """(B,) int64 sample index in the store."""


class TileBatch(TileMetadata, ModalityTensors):
    """What CPU workers yield: whole tiles in the store dtype, nodata replaced by 0.

    One (B, C, H, W) tensor per selected modality of the store under its modality key (S1
    float32 dB, S2 uint16 DN); rows of a modality a tile lacks are all 0.
    """


class EncodedTileBatch(TileMetadata):
    """What CPU workers yield when the tiles are decoded on the device (GPU decode path).

    Per selected modality the compressed whole-tile chunks of the batch, concatenated; rows
    without a chunk (absent modality, or never written) have zero length. An
    :class:`~terrafm_lightning.data.dataset.EncodedBatchDecoder` turns it into a
    :class:`TileBatch` on the device.
    """

    chunks: dict[str, Tensor]
    """modality -> uint8 (total bytes,) concatenated compressed chunks."""
    chunk_offsets: dict[str, list[int]]
    """modality -> B + 1 byte offsets into ``chunks`` (host ints: slicing needs no sync)."""


class CropBatch(TileMetadata):
    """Multi-crop training batch, made on the device by ``MultiCrop``; crops stay concatenated.

    Every crop tensor and presence mask is crop-major: row ``k * B + b`` is crop ``k`` of tile
    ``b``. Each crop dict holds every selected modality the tiles have (rows of a modality a
    tile lacks are 0); ``presence`` says which of them each crop uses. Shapes depend only on the
    batch size and crop settings, never on the draws.
    """

    global_crops: ModalityImages
    """modality -> (n_global * B, C, G, G) normalised float."""
    local_crops: ModalityImages
    """modality -> (n_local * B, C, L, L) normalised float; empty without local crops."""
    teacher_presence: Tensor
    """(n_global * B, 3) bool: the teacher's modality draw per global crop."""
    student_presence: Tensor
    """((n_global + n_local) * B, 3) bool: the student's draws, global crops first."""


class TileView(TileMetadata):
    """Whole-tile view for validation and prediction: every available modality, no crop."""

    inputs: ModalityImages
    """modality -> (B, C, S, S) normalised float, resized to the global crop size."""
    presence: Tensor
    """(B, 3) bool, equal to ``available``."""


class EvalBatch(ModalityTensors, total=False):
    """Downstream evaluation batch from ``terrafm_lightning.eval.datasets``.

    Modality keys hold normalised float32 (B, C, S, S) in stem band order (S a multiple of 16);
    ``label`` is int64 (B,) for single-label classification, float (B, K) multi-hot for
    multi-label, or int64 (B, H, W) on the native label grid for segmentation.
    """

    label: Required[Tensor]


def require(ok: Tensor, message: Callable[[], str]) -> None:
    """Raise ``ValueError(message())`` unless every element of the bool tensor ``ok`` is True.

    On CPU the check is immediate. On an accelerator it is a device-side assertion
    (``torch._assert_async``): it costs no host synchronisation, and a violation still stops the
    run, at the next synchronisation, with a device-side assert instead of this message.
    """
    try:
        torch._assert_async(ok.all())
    except RuntimeError:
        raise ValueError(message()) from None
