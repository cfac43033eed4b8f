"""Match a dataset's bands to a stem's bands by name, and normalise them.

Documented behaviour:

- Bands are matched by canonical name (``B1``, ``b01`` and ``B01`` are the same band; ``8A``
  and ``B08A`` are ``B8A``), never by position.
- Dataset bands the stem does not take are dropped (e.g. the cirrus band B10 of 13-band L1C
  data for the 12-band L1C stem).
- Stem bands the dataset lacks are an error by default (``missing="error"``). With
  ``missing="fill"`` they are filled with the normalisation mean, i.e. 0 after normalisation,
  and a ``UserWarning`` lists them; nothing is filled silently.
- NaN pixels (nodata of float data such as S1 in dB) also become the mean (0 after
  normalisation).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from terrafm_lightning.errors import UserError
from terrafm_lightning.modalities import BANDS, SSL4EO_STATS, check_modality

log = logging.getLogger(__name__)

MissingBands = Literal["error", "fill"]

_S2_NAME = re.compile(r"^B?0*(\d{1,2})(A?)$")


def canonical_band(name: str) -> str:
    """Canonical band name: ``B01``..``B12``, ``B8A``, ``VV``, ``VH`` (others upper-cased)."""
    key = name.strip().upper().replace(" ", "")
    match = _S2_NAME.match(key)
    if not match:
        return key
    number, suffix = int(match.group(1)), match.group(2)
    return f"B{number}A" if suffix else f"B{number:02d}"


@dataclass(frozen=True)
class BandMapping:
    """Which dataset channel feeds each stem band, and the stem's normalisation.

    Attributes:
        modality: the stem's modality key.
        source_bands: the dataset's band names, in its channel order.
        indices: per stem band, the dataset channel index, or None when filled.
        mean: per stem band normalisation mean.
        std: per stem band normalisation standard deviation.
    """

    modality: str
    source_bands: tuple[str, ...]
    indices: tuple[int | None, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def missing(self) -> list[str]:
        """Stem bands absent from the dataset (filled with the mean)."""
        return [b for b, i in zip(BANDS[self.modality], self.indices, strict=True) if i is None]

    @property
    def dropped(self) -> list[str]:
        """Dataset bands the stem does not take."""
        used = set(self.indices)
        return [b for i, b in enumerate(self.source_bands) if i not in used]

    def __call__(self, x: np.ndarray | Tensor) -> Tensor:
        """Select, normalise and fill: (..., C_dataset, H, W) -> float32 (..., C_stem, H, W)."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if isinstance(x, np.ndarray) else x)
        if x.shape[-3] != len(self.source_bands):
            raise UserError(
                f"{self.modality}: expected {len(self.source_bands)} channels "
                f"{list(self.source_bands)}, got shape {tuple(x.shape)}"
            )
        out = x.new_zeros(*x.shape[:-3], len(self.indices), *x.shape[-2:], dtype=torch.float32)
        for j, i in enumerate(self.indices):
            if i is not None:
                out[..., j, :, :] = (x[..., i, :, :].float() - self.mean[j]) / self.std[j]
        return out.nan_to_num_(nan=0.0)


def map_bands(
    source_bands: Sequence[str],
    modality: str,
    *,
    missing: MissingBands = "error",
    stats: Mapping[str, Sequence[float]] | None = None,
    source: str = "dataset",
) -> BandMapping:
    """Build the :class:`BandMapping` from a dataset's band names to ``modality``'s stem.

    Args:
        source_bands: the dataset's band names in channel order (any common spelling).
        modality: stem modality key (``s1``, ``s2_l1c``, ``s2_l2a``).
        missing: ``"error"`` (default) or ``"fill"`` (mean-fill with a warning) for stem bands
            the dataset lacks.
        stats: ``{"mean": [...], "std": [...]}`` in the stem's band order; defaults to the
            documented SSL4EO-S12 statistics.
        source: name of the file or dataset, used in messages.

    Raises:
        ValueError: on duplicate band names, bands missing with ``missing="error"``, an unknown
            ``missing`` mode or statistics of the wrong length.
    """
    check_modality(modality)
    if missing not in ("error", "fill"):
        raise UserError(f"missing must be 'error' or 'fill', got {missing!r}")
    names = [canonical_band(b) for b in source_bands]
    duplicates = sorted({b for b in names if names.count(b) > 1})
    if duplicates:
        raise UserError(f"{source}: duplicate bands {duplicates} in {list(source_bands)}")
    stem = BANDS[modality]
    indices = tuple(names.index(b) if b in names else None for b in stem)
    stats = stats or SSL4EO_STATS[modality]
    mean, std = tuple(map(float, stats["mean"])), tuple(map(float, stats["std"]))
    if len(mean) != len(stem) or len(std) != len(stem):
        raise UserError(
            f"{source}: statistics for {modality} need {len(stem)} values (bands {list(stem)}), "
            f"got {len(mean)} means and {len(std)} stds"
        )
    mapping = BandMapping(modality, tuple(names), indices, mean, std)
    if mapping.missing:
        message = (
            f"{source}: the {modality} stem bands {mapping.missing} are absent from the data "
            f"(bands {list(source_bands)})"
        )
        if missing == "error":
            raise UserError(message + "; pass missing_bands='fill' to fill them with the mean")
        warnings.warn(
            message + "; filled with the normalisation mean (0 after normalisation)",
            stacklevel=2,
        )
    if mapping.dropped:
        log.info("%s: bands %s not used by the %s stem", source, mapping.dropped, modality)
    return mapping
