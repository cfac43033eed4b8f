"""Band order: which input channel feeds which stem band, decided by band name.

One resolution for every reader (prep's GeoTIFF reader, the benchmark readers) and for plain
tensors given to the backbone:

- A file's bands are named by its band descriptions when every band has one, else by the
  source's documented order for its band count (:func:`file_bands`).
- A tensor's channels follow the ``in_chans`` table :data:`CHANNEL_TABLE` or an explicit list of
  band names (:func:`input_bands`).
- Names are mapped onto a stem's bands by canonical name (:func:`stem_indices`), never by
  position.

Mapping a dataset's bands for evaluation (:func:`map_bands`):

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
from terrafm_lightning.modalities import (
    BANDS,
    L1C13_STATS,
    S2_L1C_ALL_BANDS,
    SSL4EO_STATS,
    check_modality,
)

log = logging.getLogger(__name__)

MissingBands = Literal["error", "fill"]

_S2_NAME = re.compile(r"^B?0*(\d{1,2})(A?)$")

CHANNEL_TABLE: dict[int, tuple[str, tuple[str, ...]]] = {
    12: ("s2_l2a", BANDS["s2_l2a"]),
    13: ("s2_l1c", S2_L1C_ALL_BANDS),
    2: ("s1", BANDS["s1"]),
}
"""Channel count -> (modality, band order) of a plain tensor: 12 is S2 L2A (B01..B12 without
B10, B8A after B08), 13 is S2 L1C as distributed (B01..B12, B8A after B08; B10 is dropped), 2 is
S1 (VV, VH)."""

EXTRA_BANDS: dict[str, tuple[str, ...]] = {"s1": (), "s2_l1c": ("B10",), "s2_l2a": ()}
"""Bands a modality's data may carry that its stem does not take (dropped by name)."""


KNOWN_BANDS = frozenset(S2_L1C_ALL_BANDS + BANDS["s1"])
"""Canonical names of the Sentinel-1 / -2 bands."""


class BandError(ValueError):
    """Bands that do not fit a stem: an unknown or duplicate name, a missing band, a wrong count.

    The message names the source (file, dataset or argument) and what is accepted.
    """


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


def file_bands(
    descriptions: Sequence[str | None], documented: Sequence[str], source: str
) -> list[str]:
    """Canonical band names of a file, in its channel order.

    The file's band descriptions when every band has one and they name bands (at least one is
    a Sentinel-1/-2 band name; ``["BANDS", "BANDS"]`` as some S1 products write does not), else
    ``documented`` (the source's published order).

    Raises:
        BandError: naming ``source`` when the file's band count differs from ``documented``'s.
    """
    names = [canonical_band(d) if d and d.strip() else "" for d in descriptions]
    if names and all(names) and KNOWN_BANDS.intersection(names):
        return names
    if len(descriptions) != len(documented):
        raise BandError(
            f"{source}: {len(descriptions)} bands, expected {len(documented)} {list(documented)}"
        )
    return [canonical_band(b) for b in documented]


def documented_orders(modality: str) -> dict[int, tuple[str, ...]]:
    """Band count -> documented band order of ``modality``'s data (L1C: 12 or 13 bands)."""
    orders = [BANDS[check_modality(modality)]]
    orders += [o for m, o in CHANNEL_TABLE.values() if m == modality]
    return {len(o): o for o in orders}


def stem_indices(bands: Sequence[str], modality: str, source: str) -> tuple[int | None, ...]:
    """Per stem band of ``modality``, the index of that band in ``bands`` (None when absent).

    Raises:
        BandError: on duplicate names in ``bands``.
    """
    names = [canonical_band(b) for b in bands]
    duplicates = sorted({b for b in names if names.count(b) > 1})
    if duplicates:
        raise BandError(f"{source}: duplicate bands {duplicates} in {list(bands)}")
    return tuple(names.index(b) if b in names else None for b in BANDS[check_modality(modality)])


def input_bands(
    in_chans: int | None, bands: Sequence[str] | None, modality: str | None
) -> tuple[str, tuple[str, ...]]:
    """The (modality, band order) of a plain tensor given to the backbone.

    ``bands`` names the channels explicitly (any order or subset of the modality's bands);
    otherwise ``in_chans`` picks them from :data:`CHANNEL_TABLE`, or is the stem's own band
    count of ``modality``. ``modality`` defaults to the table's (``in_chans``) or ``s2_l2a``.

    Raises:
        BandError: on an unknown channel count or band name, or ``in_chans`` and ``bands`` that
            disagree; the message lists what is accepted.
    """
    if modality is not None:
        check_modality(modality)
    if bands is not None:
        modality = modality or "s2_l2a"
        accepted = BANDS[modality] + EXTRA_BANDS[modality]
        names = tuple(canonical_band(b) for b in bands)
        unknown = [b for b, n in zip(bands, names, strict=True) if n not in accepted]
        if unknown:
            raise BandError(
                f"bands {unknown} are not {modality} bands; accepted: {list(accepted)} "
                "(other modalities: pass default_modality=)"
            )
        if in_chans is not None and in_chans != len(names):
            raise BandError(f"in_chans={in_chans} but {len(names)} bands {list(bands)} given")
        stem_indices(names, modality, "bands=")
        return modality, names
    if in_chans is None:
        modality = modality or "s2_l2a"
        return modality, BANDS[modality]
    if modality is None and in_chans in CHANNEL_TABLE:
        return CHANNEL_TABLE[in_chans]
    if modality is not None and in_chans in documented_orders(modality):
        return modality, documented_orders(modality)[in_chans]
    table = ", ".join(f"{n} -> {m}" for n, (m, _) in CHANNEL_TABLE.items())
    raise BandError(
        f"in_chans={in_chans}"
        + (f" does not fit default_modality={modality!r}" if modality else " is not accepted")
        + f"; accepted: {table}, or bands=[names] for any other order or subset"
    )


def band_statistics(modality: str, bands: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """Documented mean / std (:data:`SSL4EO_STATS`) of ``bands`` of ``modality``, in that order.

    B10 (13-band L1C only) takes the published 13-band L1C statistics.
    """
    stem = BANDS[modality]
    stats = SSL4EO_STATS[modality]
    extra = L1C13_STATS if modality == "s2_l1c" else {"bands": (), "mean": (), "std": ()}
    out: dict[str, list[float]] = {"mean": [], "std": []}
    for b in map(canonical_band, bands):
        source, i = (stats, stem.index(b)) if b in stem else (extra, extra["bands"].index(b))
        out["mean"].append(source["mean"][i])
        out["std"].append(source["std"][i])
    return {k: tuple(v) for k, v in out.items()}


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
    indices = stem_indices(names, modality, source)
    stem = BANDS[modality]
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
