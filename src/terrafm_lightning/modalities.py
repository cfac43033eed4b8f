"""Modality names, band orders and published normalisation statistics.

Facts from ``shared/reference/bands.md``. The order of :data:`MODALITIES` is the column order of
every presence/availability mask in the package.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODALITIES: tuple[str, ...] = ("s1", "s2_l1c", "s2_l2a")
"""Modality keys, in presence-mask column order."""

S2_L2A_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")

BANDS: dict[str, tuple[str, ...]] = {
    "s1": ("VV", "VH"),
    # TerraFM's L1C stem takes 12 bands: the 13 L1C bands without the cirrus band B10.
    "s2_l1c": S2_L2A_BANDS,
    "s2_l2a": S2_L2A_BANDS,
}
"""Band names each stem expects, in channel order."""

S2_L1C_ALL_BANDS = S2_L2A_BANDS[:10] + ("B10",) + S2_L2A_BANDS[10:]
"""The 13 bands of an L1C product as distributed (B10 between B09 and B11)."""

UNITS: dict[str, str] = {
    "s1": "dB (10*log10 of linear gamma0, RTC)",
    "s2_l1c": "TOA reflectance x 10000, +1000 offset of baseline >= 04.00 removed",
    "s2_l2a": "BOA reflectance x 10000, +1000 offset of baseline >= 04.00 removed",
}

# SSL4EO-S12 v1 statistics (50k samples; S1 in dB), the documented default normalisation.
_L1C13_MEAN = (
    1605.58,
    1390.78,
    1314.87,
    1363.52,
    1549.44,
    2091.75,
    2371.72,
    2299.90,
    2560.30,
    830.07,
    22.10,
    2177.07,
    1524.07,
)
_L1C13_STD = (
    786.79,
    850.35,
    875.06,
    1138.85,
    1122.18,
    1161.59,
    1274.39,
    1248.43,
    1345.53,
    577.32,
    51.15,
    1336.10,
    1136.54,
)
_NO_B10 = [i for i, b in enumerate(S2_L1C_ALL_BANDS) if b != "B10"]

SSL4EO_STATS: dict[str, dict[str, tuple[float, ...]]] = {
    "s1": {"mean": (-12.548, -20.192), "std": (5.257, 5.912)},
    "s2_l1c": {
        "mean": tuple(_L1C13_MEAN[i] for i in _NO_B10),
        "std": tuple(_L1C13_STD[i] for i in _NO_B10),
    },
    "s2_l2a": {
        "mean": (
            752.40,
            884.30,
            1144.16,
            1297.47,
            1624.91,
            2194.64,
            2422.21,
            2517.76,
            2581.65,
            2645.52,
            2368.51,
            1805.07,
        ),
        "std": (
            1108.03,
            1155.15,
            1183.63,
            1368.11,
            1370.27,
            1355.55,
            1416.51,
            1474.79,
            1439.31,
            1582.28,
            1455.52,
            1343.48,
        ),
    },
}
"""Published SSL4EO-S12 v1 per-band mean/std (L1C without B10), keyed by modality."""

WORLDCOVER_CLASSES: dict[int, str] = {
    10: "tree cover",
    20: "shrubland",
    30: "grassland",
    40: "cropland",
    50: "built-up",
    60: "bare / sparse vegetation",
    70: "snow and ice",
    80: "permanent water bodies",
    90: "herbaceous wetland",
    95: "mangroves",
    100: "moss and lichen",
}
"""ESA WorldCover class codes and names (0 is no data / open ocean)."""


def worldcover_index(codes: Tensor) -> Tensor:
    """Class index (0..10, ``WORLDCOVER_CLASSES`` order) of WorldCover codes."""
    table = torch.tensor(sorted(WORLDCOVER_CLASSES), device=codes.device)
    return torch.searchsorted(table, codes)


def check_modality(name: str) -> str:
    """Return ``name`` if it is a known modality, else raise a ``ValueError`` listing them."""
    if name not in BANDS:
        raise ValueError(f"unknown modality {name!r}; expected one of {list(MODALITIES)}")
    return name
