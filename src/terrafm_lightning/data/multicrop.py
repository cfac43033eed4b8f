"""Batched on-device multi-crop, flips, normalisation and per-crop modality draws.

Runs after the batch reaches the device (``on_after_batch_transfer``), so CPU workers only read and
decode whole tiles. Crops are cut with :func:`torchvision.ops.roi_align` (``aligned=True``,
adaptive sampling ratio), one call per modality and crop size for the whole batch; its averaging
of several bilinear samples per output pixel anti-aliases the downscaling of large boxes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

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


def draw_modalities(available: Tensor, mode: DrawMode, probability: float = 0.5) -> Tensor:
    """Per-sample modality draw for one crop, never a modality the sample lacks, never empty.

    Args:
        available: (B, 3) bool, the modalities each sample has (and the model may use).
        mode: ``"all"`` every available modality; ``"one"`` exactly one, uniform over the
            available ones; ``"subset"`` each available one kept with ``probability``, rows left
            empty are redrawn (rejection sampling: exact conditional on non-empty).
        probability: keep probability in ``"subset"`` mode.

    Returns:
        (B, 3) bool presence mask.
    """
    if not bool(available.any(dim=1).all()):
        missing = torch.nonzero(~available.any(dim=1)).flatten().tolist()
        raise ValueError(f"batch rows {missing} have no available modality to draw from")
    if mode == "all":
        return available.clone()
    if mode == "one":
        choice = torch.multinomial(available.float(), 1)
        return torch.zeros_like(available).scatter_(1, choice, True)
    if mode != "subset":
        raise ValueError(f"unknown modality draw mode {mode!r}; expected all, one or subset")
    drawn = torch.zeros_like(available)
    empty = torch.ones(available.shape[0], dtype=torch.bool, device=available.device)
    while bool(empty.any()):
        keep = (torch.rand(available.shape, device=available.device) < probability) & available
        drawn = torch.where(empty[:, None], keep, drawn)
        empty = ~drawn.any(dim=1)
    return drawn


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
            raise ValueError("modalities must name at least one modality")
        if draw_mode not in ("all", "one", "subset"):
            raise ValueError(f"unknown draw_mode {draw_mode!r}; expected all, one or subset")
        if not 0.0 < draw_probability <= 1.0:
            raise ValueError(f"draw_probability must be in (0, 1], got {draw_probability}")
        if n_global < 1 or n_local < 0:
            raise ValueError(f"need n_global >= 1 and n_local >= 0, got {n_global}, {n_local}")
        for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < low <= high <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(low, high)}")
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
                raise ValueError(f"{m}: need {len(BANDS[m])} means and positive stds")
            self.register_buffer(f"mean_{m}", mean.view(1, -1, 1, 1), persistent=False)
            self.register_buffer(f"std_{m}", std.view(1, -1, 1, 1), persistent=False)

    def normalise(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Normalise whole tiles; nodata (0 after the workers' replacement) maps to 0.

        For S1 this also maps a pixel of exactly 0.0 dB to the mean: the workers replace S1
        nodata by 0 and the exact float value is too rare in real backscatter to tell apart.
        """
        out = {}
        for m in self.modalities:
            if m in batch:
                x = batch[m].float()
                z = (x - getattr(self, f"mean_{m}")) / getattr(self, f"std_{m}")
                out[m] = torch.where(x == 0, 0.0, z)
        if not out:
            raise ValueError(f"batch holds none of the modalities {list(self.modalities)}")
        return out

    def _crops(
        self, tiles: dict[str, Tensor], n: int, size: int, scale: tuple[float, float]
    ) -> list[dict[str, Tensor]]:
        reference = next(iter(tiles.values()))
        batch, _, height, width = reference.shape
        boxes = random_resized_boxes(n * batch, height, width, scale, self.ratio, reference.device)
        flips = [
            torch.rand(n * batch, device=reference.device) < 0.5 if enabled else None
            for enabled in (self.hflip, self.vflip)
        ]
        crops: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for m, x in tiles.items():
            out = crop_resize(x, boxes, size)
            for flip, dim in zip(flips, (-1, -2), strict=True):
                if flip is not None:
                    out = torch.where(flip[:, None, None, None], out.flip(dim), out)
            for k, chunk in enumerate(out.split(batch)):
                crops[k][m] = chunk
        return crops

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, object]:
        """Multi-crop a CPU-layout batch (see ``docs/contracts.md``)."""
        tiles = self.normalise(batch)
        usable = batch["available"].bool() & self.modality_mask
        out: dict[str, object] = {
            "global_crops": self._crops(tiles, self.n_global, self.global_size, self.global_scale),
            "local_crops": self._crops(tiles, self.n_local, self.local_size, self.local_scale)
            if self.n_local
            else [],
            "teacher_presence": [
                draw_modalities(usable, self.draw_mode, self.draw_probability)
                for _ in range(self.n_global)
            ],
            "student_presence": [
                draw_modalities(usable, self.draw_mode, self.draw_probability)
                for _ in range(self.n_global + self.n_local)
            ],
        }
        out.update({key: batch[key] for key in PASSTHROUGH_KEYS if key in batch})
        return out

    def whole_tiles(self, batch: Mapping[str, Tensor]) -> dict[str, object]:
        """Evaluation view: whole tiles normalised and resized to the global size, all modalities.

        Returns:
            ``inputs`` (modality -> (B, C, S, S)), ``presence`` (B, 3) and the pass-through keys.
        """
        tiles = self.normalise(batch)
        reference = next(iter(tiles.values()))
        batch_size, _, height, width = reference.shape
        box = torch.tensor([[0.0, 0.0, width, height]], device=reference.device)
        boxes = box.expand(batch_size, 4)
        out: dict[str, object] = {
            "inputs": {m: crop_resize(x, boxes, self.global_size) for m, x in tiles.items()},
            "presence": batch["available"].bool() & self.modality_mask,
        }
        out.update({key: batch[key] for key in PASSTHROUGH_KEYS if key in batch})
        return out
