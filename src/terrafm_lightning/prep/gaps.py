"""Why an input modality of a tile holds no valid pixel (a partial tile), told apart by geometry.

A tile whose input of some modality is all nodata is stored with that modality unavailable only
when the user keeps partial tiles (``--keep-partial``); otherwise it is an error. Either way the
reason is named: the input is entirely nodata, its footprint does not overlap the tile's
reference grid (another location's file), or it overlaps but has no valid pixel in this tile.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.transform import array_bounds
from rasterio.warp import transform_bounds

from terrafm_lightning.store.schema import nodata_mask

ALL_NODATA = "is entirely nodata"
NO_OVERLAP = "does not overlap the reference grid"
NONE_IN_TILE = "has no valid pixel in this tile"

GapExplainer = Callable[[int, str], tuple[str, str]]
"""``(sample index, modality) -> (reason, input name)`` of a source, for its partial tiles."""


def gap_reason(
    modality: str,
    data: np.ndarray,
    crs: CRS,
    transform: rasterio.Affine,
    tile_crs: CRS | str,
    tile_transform: rasterio.Affine,
    tile_size: int,
) -> str:
    """Reason an input ``data`` (band, y, x; store units, own grid) leaves a tile without pixels."""
    if nodata_mask(modality, data).all():
        return ALL_NODATA
    left, bottom, right, top = transform_bounds(crs, tile_crs, *array_bounds(
        data.shape[1], data.shape[2], transform))  # fmt: skip
    t_left, t_bottom, t_right, t_top = array_bounds(tile_size, tile_size, tile_transform)
    overlaps = left < t_right and right > t_left and bottom < t_top and top > t_bottom
    return NONE_IN_TILE if overlaps else NO_OVERLAP
