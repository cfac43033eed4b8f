"""Procedural co-registered S1 / S2-L1C / S2-L2A / WorldCover scenes for tests and the demo.

Each tile gets a long-tailed land-cover map (smooth random class fields plus a boosted dominant
class drawn from :data:`CLASS_PRIOR`), class-dependent S2 L2A spectra with class-dependent texture,
L1C = L2A x band transmittance + an Angstrom-law atmospheric path term, and S1 dB backscatter per
class with multiplicative gamma speckle. Some tiles lack a modality, some carry nodata regions,
some coastal water tiles carry WorldCover no data (open ocean). Optional acquisition nuisance
(``nuisance`` > 0, see :func:`apply_nuisance`) varies brightness independently per sensor product
while the land cover stays the same. Fully determined by (seed, sample index).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Any

import numpy as np

from terrafm_lightning.modalities import MODALITIES
from terrafm_lightning.prep.driver import PrepReport
from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.prep.writer import write_tiles
from terrafm_lightning.store.records import Sample
from terrafm_lightning.store.schema import WORLDCOVER_CODES, Encoding

CLASS_PRIOR: dict[int, float] = {
    10: 0.30,
    20: 0.08,
    30: 0.20,
    40: 0.15,
    50: 0.02,
    60: 0.10,
    70: 0.03,
    80: 0.08,
    90: 0.015,
    95: 0.005,
    100: 0.02,
}
"""Long-tailed class prior (tree, grass, crop dominate; wetland, mangroves, built-up are rare)."""

# Typical surface reflectance x 10000, bands B01..B12 without B10, per WorldCover class.
L2A_SPECTRA: dict[int, tuple[int, ...]] = {
    10: (300, 350, 600, 350, 900, 2200, 2700, 2900, 3000, 3000, 1500, 700),
    20: (500, 600, 850, 900, 1300, 1900, 2200, 2400, 2500, 2500, 2600, 1700),
    30: (450, 550, 900, 800, 1400, 2500, 2900, 3100, 3200, 3200, 2400, 1400),
    40: (400, 500, 900, 600, 1300, 3000, 3600, 3900, 4000, 4000, 2300, 1200),
    50: (1100, 1200, 1300, 1400, 1500, 1700, 1800, 1900, 2000, 2000, 2300, 2100),
    60: (1400, 1600, 2000, 2500, 2800, 3000, 3100, 3200, 3300, 3300, 4200, 3600),
    70: (7500, 8000, 8200, 8300, 8100, 7800, 7600, 7500, 7300, 7000, 600, 500),
    80: (500, 600, 500, 300, 250, 200, 180, 160, 150, 140, 80, 60),
    90: (450, 500, 700, 500, 900, 1600, 1900, 2100, 2200, 2200, 1300, 700),
    95: (250, 300, 500, 250, 800, 2000, 2500, 2700, 2800, 2800, 1100, 450),
    100: (700, 800, 1000, 1100, 1500, 2000, 2200, 2300, 2400, 2400, 2500, 1700),
}
# Relative amplitude of the spatial texture per class (built-up rough, water smooth).
TEXTURE: dict[int, float] = {
    10: 0.15,
    20: 0.2,
    30: 0.08,
    40: 0.25,
    50: 0.45,
    60: 0.1,
    70: 0.05,
    80: 0.03,
    90: 0.2,
    95: 0.12,
    100: 0.15,
}
# S1 RTC backscatter (VV, VH) in dB per class.
S1_DB: dict[int, tuple[float, float]] = {
    10: (-7.0, -13.0),
    20: (-9.0, -16.0),
    30: (-10.0, -17.0),
    40: (-9.0, -15.0),
    50: (-3.0, -9.0),
    60: (-14.0, -22.0),
    70: (-12.0, -20.0),
    80: (-20.0, -27.0),
    90: (-8.0, -15.0),
    95: (-6.0, -12.0),
    100: (-12.0, -19.0),
}
WAVELENGTH_UM = np.array(
    [0.443, 0.49, 0.56, 0.665, 0.705, 0.74, 0.783, 0.842, 0.865, 0.945, 1.61, 2.19]
)
# TOA/BOA transmittance per band; B09 sits in a water-vapour absorption band.
TRANSMITTANCE = np.array([0.85, 0.88, 0.9, 0.92, 0.93, 0.94, 0.94, 0.95, 0.95, 0.6, 0.96, 0.95])
SPECKLE_LOOKS = 4.0
GAIN_RANGE = (0.9, 1.1)
"""Default range of the per-tile S2 illumination gain."""
S2_NOISE = 0.03
"""Default relative per-pixel S2 noise (std); more noise makes land cover harder to read."""
NUISANCE_LOG_GAIN = 0.4
"""Std of the per-tile and of the smooth S2 log-gain field at ``nuisance`` 1."""
NUISANCE_HAZE = 800.0
"""Largest extra L1C haze (DN at B01) at ``nuisance`` 1, smooth over the tile."""
NUISANCE_S1_DB = (3.5, 1.5)
"""Largest S1 per-tile dB offset and calibration gradient across the tile at ``nuisance`` 1."""
P_MISSING = {"s1": 0.1, "s2_l1c": 0.05, "s2_l2a": 0.05}
P_NODATA_REGION = 0.1

_CODES = np.array(WORLDCOVER_CODES, dtype=np.uint8)
_PRIOR = np.array([CLASS_PRIOR[c] for c in WORLDCOVER_CODES])
_SPECTRA = np.array([L2A_SPECTRA[c] for c in WORLDCOVER_CODES], dtype=np.float32)
_TEXTURE = np.array([TEXTURE[c] for c in WORLDCOVER_CODES], dtype=np.float32)
_S1 = np.array([S1_DB[c] for c in WORLDCOVER_CODES], dtype=np.float32)


@lru_cache(maxsize=8)
def _interpolation(size: int, grid: int) -> np.ndarray:
    """(size, grid) linear interpolation weights from a coarse grid to ``size`` pixels."""
    position = np.linspace(0, grid - 1, size)
    lower = np.clip(np.floor(position).astype(int), 0, grid - 2)
    frac = position - lower
    weights = np.zeros((size, grid), np.float32)
    weights[np.arange(size), lower] = 1 - frac
    weights[np.arange(size), lower + 1] = frac
    return weights


def smooth_fields(rng: np.random.Generator, n: int, size: int, grid: int) -> np.ndarray:
    """(n, size, size) smooth unit-variance random fields (coarse noise, bilinear upsampling)."""
    w = _interpolation(size, grid)
    coarse = rng.standard_normal((n, grid, grid)).astype(np.float32)
    return w @ coarse @ w.T


def land_cover(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """A class-index map (size, size) with a dominant class drawn from the long-tailed prior."""
    dominant = int(rng.choice(len(_PRIOR), p=_PRIOR))
    logits = smooth_fields(rng, len(_PRIOR), size, 6) * 1.2 + np.log(_PRIOR)[:, None, None]
    logits[dominant] += 2.5
    return logits.argmax(axis=0).astype(np.uint8), dominant


def _nodata_region(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size) True inside a random half-plane cut through one corner (orbit edge)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(-1, 1, 2)
    return a * (yy - 0.5) + b * (xx - 0.5) > rng.uniform(0.3, 0.6)


def apply_nuisance(
    rng: np.random.Generator,
    l2a: np.ndarray,
    l1c: np.ndarray,
    s1: np.ndarray,
    path: np.ndarray,
    strength: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acquisition nuisance, drawn independently per sensor product (they have their own dates).

    S2 L2A and L1C: a per-tile log-gain plus a smooth log-gain field with a correlation length of
    about half a tile (illumination, thin cloud), so two crops of one tile differ in brightness;
    L1C also gets extra smooth haze with the path term's spectral shape. S1: a per-tile dB offset
    (incidence angle, calibration) and a linear dB gradient across the tile. Band ratios and
    backscatter contrasts, which carry the land cover, are kept.
    """
    size = l2a.shape[-1]
    grid = 4  # coarse nodes 1/3 tile apart: the field decorrelates over about half a tile

    def log_gain() -> np.ndarray:
        field = rng.standard_normal() + smooth_fields(rng, 1, size, grid)[0]
        return np.exp(strength * NUISANCE_LOG_GAIN * field).astype(np.float32)

    l2a = l2a * log_gain()
    haze = strength * NUISANCE_HAZE * rng.uniform() * (1 + smooth_fields(rng, 1, size, grid)[0])
    haze_spectrum = (path / path[0]).astype(np.float32)[:, None, None]
    l1c = l1c * log_gain() + haze_spectrum * haze.clip(0, None)
    offset_db, gradient_db = NUISANCE_S1_DB
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = gradient_db * (np.cos(angle) * xx + np.sin(angle) * yy)
    s1 = s1 + (strength * (rng.uniform(-offset_db, offset_db) + ramp)).astype(np.float32)
    return l2a, l1c, s1


def synthetic_scene(
    seed: int,
    index: int,
    size: int = 534,
    gain_range: tuple[float, float] = GAIN_RANGE,
    s2_noise: float = S2_NOISE,
    nuisance: float = 0.0,
) -> Sample:
    """The synthetic sample ``index`` of dataset ``seed`` (4 tiles per fake grid cell).

    ``nuisance`` scales :func:`apply_nuisance` (0: none); its draws come from their own random
    stream, so the land cover and every other draw are the same for every strength.
    """
    cell, tile_index = divmod(index, 4)
    rng = np.random.default_rng([seed, index])
    classes, _ = land_cover(rng, size)
    texture = smooth_fields(rng, 1, size, max(size // 8, 2))[0]
    gain = 1 + _TEXTURE[classes] * texture
    noise = 1 + s2_noise * rng.standard_normal((12, size, size), dtype=np.float32)
    l2a = _SPECTRA[classes].transpose(2, 0, 1) * gain * noise * rng.uniform(*gain_range)
    aerosol = rng.uniform(300, 1200)
    path = aerosol * (WAVELENGTH_UM / WAVELENGTH_UM[0]) ** -1.5
    l1c = l2a * TRANSMITTANCE[:, None, None] + path[:, None, None].astype(np.float32)
    linear = 10 ** (_S1[classes].transpose(2, 0, 1) / 10)
    speckle = rng.gamma(SPECKLE_LOOKS, 1 / SPECKLE_LOOKS, (2, size, size)).astype(np.float32)
    s1 = 10 * np.log10(linear * speckle * (1 + 0.3 * texture.clip(-2, 2) ** 2 * (classes == 4)))
    if nuisance > 0:
        nuisance_rng = np.random.default_rng([seed, index, 2])
        l2a, l1c, s1 = apply_nuisance(nuisance_rng, l2a, l1c, s1, path, nuisance)
    pixels = {
        "s1": s1.astype(np.float32),
        "s2_l1c": l1c.clip(1, 65535).astype(np.uint16),
        "s2_l2a": l2a.clip(1, 65535).astype(np.uint16),
    }
    if rng.random() < P_NODATA_REGION:
        region = _nodata_region(rng, size)
        for m in ("s2_l1c", "s2_l2a"):
            pixels[m][:, region] = 0
    if rng.random() < P_NODATA_REGION / 2:
        pixels["s1"][:, _nodata_region(rng, size)] = np.nan
    missing = [m for m in MODALITIES if rng.random() < P_MISSING[m]]
    for m in missing[: len(MODALITIES) - 1]:
        del pixels[m]
    worldcover = _CODES[classes]
    water = WORLDCOVER_CODES.index(80)
    if rng.random() < 0.3:
        worldcover = np.where((classes == water) & (texture > 0), 0, worldcover).astype(np.uint8)
    return Sample(
        pixels=pixels,
        worldcover=worldcover,
        **_cell_geometry(seed, cell, tile_index, size),
    )


def _cell_geometry(seed: int, cell: int, tile_index: int, size: int) -> dict:
    """Grid cell name, UTM CRS, tile transform and per-sensor times of a fake grid cell."""
    rng = np.random.default_rng([seed, cell, 1])
    lat, lon = rng.uniform(-55, 70), rng.uniform(-179, 179)
    zone = int((lon + 180) // 6) + 1
    epsg = (32600 if lat >= 0 else 32700) + zone
    northing = lat * 110_574.0 + (0 if lat >= 0 else 10_000_000)
    easting = 500_000 + (lon - (zone * 6 - 183)) * 111_320 * np.cos(np.radians(lat))
    row, col = divmod(tile_index, 2)
    x0, y0 = easting + col * size * 10.0, northing - row * size * 10.0
    base = np.datetime64("2020-01-01T00:00:00", "s")
    times = {
        m: base + np.timedelta64(int(rng.integers(0, 4 * 365 * 86400)), "s") for m in MODALITIES
    }
    grid_row, grid_col = int(abs(lat) / 0.0898), int(abs(lon) / 0.0898)
    return {
        "grid_cell": f"{grid_row}{'U' if lat >= 0 else 'D'}_{grid_col}{'R' if lon >= 0 else 'L'}",
        "tile_index": tile_index,
        "crs": f"EPSG:{epsg}",
        "transform": (10.0, 0.0, float(x0), 0.0, -10.0, float(y0)),
        "times": times,
    }


def prepare_synthetic(
    path: str,
    n_samples: int,
    tile_size: int = 534,
    seed: int = 0,
    gain_range: tuple[float, float] = GAIN_RANGE,
    s2_noise: float = S2_NOISE,
    nuisance: float = 0.0,
    *,
    encoding: Encoding | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **run_options: Any,
) -> PrepReport:
    """Write (or finish writing) a synthetic store of ``n_samples`` tiles (public Python API).

    Args:
        path: output store (local path or fsspec URL).
        n_samples: number of tiles.
        tile_size: tile size in pixels.
        seed: dataset seed (tile i is fixed by (seed, i)).
        gain_range: range of the per-tile S2 illumination gain.
        s2_noise: relative per-pixel S2 noise std.
        nuisance: strength of the per-sensor acquisition nuisance (0: none).
        encoding: store chunking/compression.
        overwrite: replace an existing store at ``path``.
        storage_options: fsspec options of the output store.
        **run_options: :func:`driver.run_shards` options: ``scheduler`` ("local", "sync" or an
            address), ``workers``, ``skip_bad``, ``progress``.
    """
    if not 0 < gain_range[0] <= gain_range[1]:
        raise InputError(f"gain_range must satisfy 0 < low <= high, got {gain_range}")
    plan = {"kind": "synthetic", "n_samples": n_samples, "tile_size": tile_size, "seed": seed}
    if s2_noise < 0:
        raise InputError(f"s2_noise must be >= 0, got {s2_noise}")
    if nuisance < 0:
        raise InputError(f"nuisance must be >= 0, got {nuisance}")
    # Stores written before these options existed keep their digest (resume stays possible).
    if tuple(gain_range) != GAIN_RANGE:
        plan["gain_range"] = list(gain_range)
    if s2_noise != S2_NOISE:
        plan["s2_noise"] = s2_noise
    if nuisance:
        plan["nuisance"] = nuisance
    make = partial(
        synthetic_scene,
        seed,
        size=tile_size,
        gain_range=tuple(gain_range),
        s2_noise=s2_noise,
        nuisance=nuisance,
    )
    return write_tiles(
        path,
        make,
        n_samples,
        tile_size,
        MODALITIES,
        plan,
        f"terrafm-data synthetic (seed {seed})",
        encoding=encoding,
        overwrite=overwrite,
        storage_options=storage_options,
        **run_options,
    )
