"""Batched on-device multi-crop, flips, normalisation and per-crop modality draws.

Runs after the batch reaches the device (``on_after_batch_transfer``), so CPU workers only read and
decode whole tiles. Crops are cut with :func:`torchvision.ops.roi_align` (``aligned=True``,
adaptive sampling ratio), one call per modality and crop size for the whole batch; its averaging
of several bilinear samples per output pixel anti-aliases the downscaling of large boxes. Crops
stay concatenated (one tensor per modality and crop size) and every step has the same shapes and
no host synchronisation: the modality draws sample each crop's subset directly from its exact
distribution instead of redrawing empty ones (written here: no library draws masked subsets).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from terrafm_lightning.batch import CropBatch, ModalityImages, TileView, require
from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import BANDS, MODALITIES, SSL4EO_STATS, check_modality

DrawMode = Literal["all", "one", "subset"]
PASSTHROUGH_KEYS = ("available", "dominant_class", "worldcover_hist", "index")


def random_resized_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str | None = None,
) -> Tensor:
    """Random-resized-crop boxes ``(n, 4)`` as ``x0, y0, x1, y1`` pixel coordinates.

    The area share is uniform in ``scale``, the aspect ratio log-uniform in ``ratio``; a box that
    would exceed the tile is clamped to it (instead of torchvision's rejection retries), the
    position is uniform over the valid range.
    """
    area = torch.empty(n, device=device).uniform_(*scale) * (height * width)
    log_ratio = torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    box_w = torch.sqrt(area * aspect).clamp(1.0, width)
    box_h = torch.sqrt(area / aspect).clamp(1.0, height)
    x0 = torch.rand(n, device=device) * (width - box_w)
    y0 = torch.rand(n, device=device) * (height - box_h)
    return torch.stack([x0, y0, x0 + box_w, y0 + box_h], dim=1)


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Cut ``boxes`` (n_crops * B, 4), crop-major, from ``images`` (B, C, H, W) resized to ``size``.

    Returns:
        (n_crops * B, C, size, size); row ``k * B + b`` is crop k of sample b.
    """
    batch = images.shape[0]
    sample = torch.arange(batch, device=images.device, dtype=boxes.dtype)
    sample = sample.repeat(boxes.shape[0] // batch)
    rois = torch.cat([sample[:, None], boxes], dim=1)
    return roi_align(images, rois, output_size=size, sampling_ratio=-1, aligned=True)


def _subset_bits(device: torch.device) -> Tensor:
    """(7, 3) bool: the non-empty modality subsets; row ``k`` is the bit pattern of ``k + 1``."""
    codes = torch.arange(1, 2 ** len(MODALITIES), device=device)
    return (codes[:, None] >> torch.arange(len(MODALITIES), device=device)) & 1 == 1


def draw_modalities(available: Tensor, mode: DrawMode, probability: float = 0.5) -> Tensor:
    """Per-row modality draw, never a modality the row lacks, never empty; no host sync.

    Each row draws one of the 7 non-empty subsets with its exact probability under ``mode``,
    by inverse-CDF sampling (one uniform per row), so shapes are static and nothing is redrawn:

    - ``"all"``: the available subset.
    - ``"one"``: one available modality, uniform.
    - ``"subset"``: each available modality kept with ``probability``, conditioned on at least
      one kept: P(S) = p^|S| (1 - p)^(|A| - |S|) / (1 - (1 - p)^|A|) for S a non-empty subset
      of the available set A -- the distribution of the paper's rejection loop.

    Args:
        available: (R, 3) bool, the modalities each row has (and the model may use).
        mode: ``"all"``, ``"one"`` or ``"subset"``.
        probability: keep probability in ``"subset"`` mode.

    Returns:
        (R, 3) bool presence mask.

    Raises:
        ValueError: a row has no available modality (at once on CPU; on an accelerator the
            check is a device-side assertion, so it costs no synchronisation).
    """
    if mode not in ("all", "one", "subset"):
        raise UserError(f"unknown modality draw mode {mode!r}; expected all, one or subset")
    usable = available.any(dim=1)
    require(
        usable,
        lambda: (
            f"batch rows {torch.nonzero(~usable).flatten().tolist()} have no available "
            "modality to draw from"
        ),
    )
    subsets = _subset_bits(available.device)[None]  # (1, 7, 3)
    have = available[:, None, :]  # (R, 1, 3)
    inside = (subsets <= have).all(dim=-1)  # (R, 7): subset of the available set
    if mode == "all":
        weights = (subsets == have).all(dim=-1).float()
    elif mode == "one":
        weights = (inside & (subsets.sum(dim=-1) == 1)).float()
    else:
        # Modalities a row lacks contribute a factor 1 (never drawn, never a choice).
        factor = torch.where(subsets, probability, torch.where(have, 1.0 - probability, 1.0))
        weights = torch.where(inside, factor.prod(dim=-1), 0.0)
    cdf = weights.cumsum(dim=1)
    u = torch.rand(available.shape[0], 1, device=available.device) * cdf[:, -1:]
    choice = (cdf <= u).sum(dim=1).clamp_max(subsets.shape[1] - 1)
    return subsets[0, choice]


class MultiCrop(nn.Module):
    """DINO multi-crop with TerraFM's per-crop modality draws, batched on the device.

    Turns the CPU batch of ``docs/contracts.md`` (whole tiles, nodata replaced by 0) into global
    and local crops, normalised, plus the teacher's and the student's presence masks.

    Args:
        modalities: modalities the model may use (others are treated as absent).
        n_global: number of global crops (teacher and student).
        global_size: global crop output size in pixels.
        global_scale: area-share range of global crops.
        n_local: number of local crops (student only).
        local_size: local crop output size in pixels.
        local_scale: area-share range of local crops.
        ratio: aspect-ratio range of every crop.
        hflip: flip each crop left-right with probability 0.5.
        vflip: flip each crop upside-down with probability 0.5.
        draw_mode: per-crop modality draw, see :func:`draw_modalities`.
        draw_probability: keep probability of ``"subset"`` draws.
        stats: per-modality ``{"mean": [...], "std": [...]}``, e.g. a store's ``stats``
            attribute; modalities missing here use :data:`SSL4EO_STATS`.
    """

    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        n_global: int = 2,
        global_size: int = 224,
        global_scale: tuple[float, float] = (0.25, 1.0),
        n_local: int = 6,
        local_size: int = 96,
        local_scale: tuple[float, float] = (0.05, 0.25),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: bool = True,
        vflip: bool = True,
        draw_mode: DrawMode = "subset",
        draw_probability: float = 0.5,
        stats: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
    ) -> None:
        super().__init__()
        wanted = {check_modality(m) for m in modalities}
        self.modalities = tuple(m for m in MODALITIES if m in wanted)
        if not self.modalities:
            raise UserError("modalities must name at least one modality")
        if draw_mode not in ("all", "one", "subset"):
            raise UserError(f"unknown draw_mode {draw_mode!r}; expected all, one or subset")
        if not 0.0 < draw_probability <= 1.0:
            raise UserError(f"draw_probability must be in (0, 1], got {draw_probability}")
        if n_global < 1 or n_local < 0:
            raise UserError(f"need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < low <= high <= 1.0:
                raise UserError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
        self.n_global, self.global_size, self.global_scale = n_global, global_size, global_scale
        self.n_local, self.local_size, self.local_scale = n_local, local_size, local_scale
        self.ratio, self.hflip, self.vflip = ratio, hflip, vflip
        self.draw_mode, self.draw_probability = draw_mode, draw_probability
        stats = stats or {}
        mask = torch.tensor([m in wanted for m in MODALITIES])
        self.register_buffer("modality_mask", mask, persistent=False)
        for m in self.modalities:
            source = stats.get(m, SSL4EO_STATS[m])
            mean = torch.tensor(source["mean"], dtype=torch.float32)
            std = torch.tensor(source["std"], dtype=torch.float32)
            if mean.numel() != len(BANDS[m]) or std.numel() != len(BANDS[m]) or (std <= 0).any():
                raise UserError(f"{m}: need {len(BANDS[m])} means and positive stds")
            # z = (x - mean) / std as one multiply-add: z = x * scale + shift.
            self.register_buffer(f"scale_{m}", (1 / std).view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"shift_{m}", (-mean / std).view(1, -1, 1, 1), persistent=False)

    def normalise(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Normalise whole tiles; nodata (0 after the workers' replacement) maps to 0.

        For S1 this also maps a pixel of exactly 0.0 dB to the mean: the workers replace S1
        nodata by 0 and the exact float value is too rare in real backscatter to tell apart.
        """
        out = {}
        for m in self.modalities:
            if m in batch:
                x = batch[m].float()
                z = torch.addcmul(getattr(self, f"shift_{m}"), x, getattr(self, f"scale_{m}"))
                out[m] = torch.where(x == 0, 0.0, z)
        if not out:
            raise UserError(f"batch holds none of the modalities {list(self.modalities)}")
        return out

    def _crops(
        self, tiles: dict[str, Tensor], n: int, size: int, scale: tuple[float, float]
    ) -> ModalityImages:
        """``n`` crops of every tile, modality -> (n * B, C, size, size), crop-major."""
        reference = next(iter(tiles.values()))
        batch, _, height, width = reference.shape
        device = reference.device
        boxes = random_resized_boxes(n * batch, height, width, scale, self.ratio, device)
        crops = {m: crop_resize(x, boxes, size) for m, x in tiles.items()}
        if not (self.hflip or self.vflip):
            return crops
        # Flips as one gather per crop tensor: each row reads its pixels in (possibly mirrored)
        # order, instead of a flipped copy plus a select per direction.
        pixels = torch.arange(size, device=device)
        rows, cols = (
            torch.where(torch.rand(n * batch, 1, device=device) < 0.5, size - 1 - pixels, pixels)
            if enabled
            else pixels.expand(n * batch, size)
            for enabled in (self.vflip, self.hflip)
        )
        order = (rows[:, :, None] * size + cols[:, None, :]).flatten(1)
        for m, out in crops.items():
            index = order[:, None, :].expand(-1, out.shape[1], -1)
            crops[m] = out.flatten(2).gather(2, index).view_as(out)
        return crops

    def forward(self, batch: Mapping[str, Tensor]) -> CropBatch:
        """Multi-crop a CPU-layout batch (see ``docs/contracts.md``) without host syncs."""
        tiles = self.normalise(batch)
        usable = batch["available"].bool() & self.modality_mask
        n_teacher, n_student = self.n_global, self.n_global + self.n_local
        # One draw for every crop of the teacher and the student, each row independent.
        presence = draw_modalities(
            usable.repeat(n_teacher + n_student, 1), self.draw_mode, self.draw_probability
        )
        out: CropBatch = {
            "global_crops": self._crops(tiles, self.n_global, self.global_size, self.global_scale),
            "local_crops": self._crops(tiles, self.n_local, self.local_size, self.local_scale)
            if self.n_local
            else {},
            "teacher_presence": presence[: n_teacher * usable.shape[0]],
            "student_presence": presence[n_teacher * usable.shape[0] :],
        }
        out.update({key: batch[key] for key in PASSTHROUGH_KEYS if key in batch})
        return out

    def whole_tiles(self, batch: Mapping[str, Tensor], size: int | None = None) -> TileView:
        """Evaluation view: whole tiles normalised and resized, every available modality.

        Args:
            batch: a CPU-layout tile batch (``TileBatch``) on the device.
            size: output side in pixels (a multiple of 16); the global crop size by default.

        Returns:
            ``inputs`` (modality -> (B, C, S, S)), ``presence`` (B, 3) and the pass-through keys.
        """
        tiles = self.normalise(batch)
        reference = next(iter(tiles.values()))
        batch_size, _, height, width = reference.shape
        box = torch.tensor([[0.0, 0.0, width, height]], device=reference.device)
        boxes = box.expand(batch_size, 4)
        out: TileView = {
            "inputs": {
                m: crop_resize(x, boxes, size or self.global_size) for m, x in tiles.items()
            },
            "presence": batch["available"].bool() & self.modality_mask,
        }
        out.update({key: batch[key] for key in PASSTHROUGH_KEYS if key in batch})
        return out
