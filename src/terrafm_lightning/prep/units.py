"""Input pixels checked against the store unit of their modality, and the documented conversions.

Store units (:data:`terrafm_lightning.modalities.UNITS`): S1 float32 dB, S2 uint16 DN
(reflectance x 10000, 0 = nodata). Valid input pixels are the finite ones that are not the file's
declared nodata value. What does not fit is an :class:`InputError` naming the file, its dtype, the
observed range of its valid pixels and the option that converts it, where one is defined:

- S1 must be float. Without conversion the values must be dB: a file with no negative value is
  linear power (``--s1-linear-to-db`` stores 10*log10 of it) and values outside :data:`DB_RANGE`
  are refused. With the conversion a negative value means the file is dB already. Integer S1
  (DN, amplitude) has no defined conversion.
- S2 integer values must fit 0..65535 (0 stays nodata).
- S2 float needs ``--s2-reflectance-scale F``: values are multiplied by F and rounded (10000 for
  reflectance 0-1, 1 for float DN); valid pixels are clipped to 1..65535 so they stay valid, as
  Major-TOM's offset removal does. A scaled value above 65535 means the scale is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from terrafm_lightning.prep.errors import InputError
from terrafm_lightning.store.schema import NODATA, PIXEL_DTYPES

DB_RANGE = (-100.0, 100.0)
"""Valid S1 backscatter in dB lies well inside this (RTC gamma0 is about -50..+30 dB); a value
outside is an undeclared nodata value or another unit."""
DN_MAX = 65535
DB_PER_LN = np.float32(10 / np.log(10))
"""10 log10(x) = DB_PER_LN ln(x): numpy's float32 ``log`` is vectorised, its ``log10`` is not
(measured 9 against 19-35 ms per 1068 px S1 pair of bands; results within 2 float32 ulp)."""


@dataclass(frozen=True)
class UnitConversion:
    """Conversions the user asked for (``terrafm-data geotiff`` options).

    Attributes:
        s2_reflectance_scale: float S2 inputs are multiplied by this and rounded to DN (None:
            float S2 is refused).
        s1_linear_to_db: S1 inputs are linear power, stored as 10*log10.
    """

    s2_reflectance_scale: float | None = None
    s1_linear_to_db: bool = False

    def plan(self) -> dict[str, Any]:
        """The conversions in effect, for the run's source digest (empty when none)."""
        out: dict[str, Any] = {}
        if self.s2_reflectance_scale is not None:
            out["s2_reflectance_scale"] = self.s2_reflectance_scale
        if self.s1_linear_to_db:
            out["s1_linear_to_db"] = True
        return out


def linear_to_db(linear: np.ndarray) -> np.ndarray:
    """Linear power -> float32 dB; non-finite and <= 0 (nodata, -32768) become NaN.

    Computed in float32 (the store dtype): half the memory traffic of float64.
    """
    linear = linear.astype(np.float32, copy=False)
    valid = (linear > 0) & (linear < np.inf)  # also excludes NaN and -32768
    out = np.full(linear.shape, np.nan, np.float32)
    np.log(linear, out=out, where=valid)
    out *= DB_PER_LN
    return out


def _valid_range(pixels: np.ndarray, nodata: float | None) -> tuple[float, float] | None:
    """(min, max) of the finite pixels other than ``nodata``; None when there is none."""
    valid = np.isfinite(pixels) if pixels.dtype.kind == "f" else np.ones(pixels.shape, bool)
    if nodata is not None and not np.isnan(nodata):
        valid &= pixels != nodata
    if not valid.any():
        return None
    values = pixels[valid]
    return float(values.min()), float(values.max())


def _refuse(
    source: str, modality: str, pixels: np.ndarray, seen: tuple[float, float], why: str
) -> InputError:
    """The error naming ``source``, its dtype, the observed range of valid pixels and the fix."""
    return InputError(
        f"{source}: {modality} input is {pixels.dtype} with values {seen[0]:g}..{seen[1]:g}; {why}"
    )


def s1_to_db(
    pixels: np.ndarray, nodata: float | None, source: str, linear: bool = False
) -> np.ndarray:
    """S1 pixels (band, y, x) as float32 dB with NaN nodata; ``linear``: they are linear power.

    A float32 ``pixels`` is changed in place (the sources own their decoded arrays).

    Raises:
        InputError: naming ``source`` for integer input, or values that are not of the unit.
    """
    if pixels.dtype.kind != "f":
        seen = _valid_range(pixels, nodata) or (0.0, 0.0)
        raise _refuse(
            source,
            "s1",
            pixels,
            seen,
            "S1 must be float dB (or float linear power with --s1-linear-to-db); "
            "integer S1 (DN, amplitude) has no defined conversion",
        )
    out = pixels.astype(np.float32, copy=False)
    if nodata is not None and not np.isnan(nodata):
        out[pixels == nodata] = np.nan
    if linear:  # linear_to_db makes non-finite values NaN itself: one reduction suffices here
        low = np.fmin.reduce(out, axis=None)
        if low < 0:
            seen = (float(low), float(np.fmax.reduce(out, axis=None)))
            raise _refuse(
                source,
                "s1",
                pixels,
                seen,
                "negative values are dB already, not linear power: drop --s1-linear-to-db",
            )
        return linear_to_db(out)
    out[~np.isfinite(out)] = np.nan
    low, high = np.fmin.reduce(out, axis=None), np.fmax.reduce(out, axis=None)
    if np.isnan(low):
        return out  # no valid pixel: reported per tile by the writer
    if low >= 0:
        raise _refuse(
            source,
            "s1",
            pixels,
            (low, high),
            "no negative value: this is linear power, not dB; pass --s1-linear-to-db "
            "to store 10*log10 of it",
        )
    if low < DB_RANGE[0] or high > DB_RANGE[1]:
        raise _refuse(
            source,
            "s1",
            pixels,
            (low, high),
            f"dB values lie within {DB_RANGE[0]:g}..{DB_RANGE[1]:g}: declare the file's "
            "nodata value (gdal_edit.py -a_nodata VALUE FILE) or convert it to dB",
        )
    return out


def s2_to_dn(
    modality: str, pixels: np.ndarray, nodata: float | None, source: str, scale: float | None
) -> np.ndarray:
    """S2 pixels (band, y, x) as uint16 DN with 0 nodata; float input is scaled by ``scale``.

    Raises:
        InputError: naming ``source`` for float input without ``scale``, or values outside DN.
    """
    if pixels.dtype == np.uint16 and nodata in (None, 0):
        return pixels  # already store dtype and nodata: no copy, nothing to check
    if pixels.dtype.kind in "iu":
        low = int(pixels.min())
        high = int(pixels.max()) if np.iinfo(pixels.dtype).max > DN_MAX else 0
        if low < 0 or high > DN_MAX:
            seen = _valid_range(pixels, nodata)
            if seen is not None and (seen[0] < 0 or seen[1] > DN_MAX):
                raise _refuse(
                    source,
                    modality,
                    pixels,
                    seen,
                    f"S2 DN lie within 0..{DN_MAX} (0 nodata): declare the file's "
                    "nodata value (gdal_edit.py -a_nodata VALUE FILE)",
                )
        invalid = np.zeros(pixels.shape, bool)
        values = pixels
    else:
        seen = _valid_range(pixels, nodata)
        if seen is None:
            return np.zeros(pixels.shape, PIXEL_DTYPES[modality])  # all nodata
        if scale is None:
            raise _refuse(
                source,
                modality,
                pixels,
                seen,
                "the store holds DN (reflectance x 10000, uint16): pass "
                "--s2-reflectance-scale 10000 for reflectance 0-1, or 1 for float DN",
            )
        if seen[1] * scale > DN_MAX:
            raise _refuse(
                source,
                modality,
                pixels,
                seen,
                f"x {scale:g} exceeds DN {DN_MAX}: use a smaller "
                "--s2-reflectance-scale (1 for float DN)",
            )
        invalid = ~np.isfinite(pixels)
        values = np.clip(np.rint(np.nan_to_num(pixels) * scale), 1, DN_MAX)
    if nodata is not None and not np.isnan(nodata):
        invalid |= pixels == nodata
    out = np.clip(values, 0, DN_MAX).astype(PIXEL_DTYPES[modality])
    out[invalid] = NODATA[modality]
    return out


def to_store_units(
    modality: str,
    pixels: np.ndarray,
    nodata: float | None,
    source: str,
    conversion: UnitConversion | None = None,
) -> np.ndarray:
    """``pixels`` (band, y, x) of ``source`` in the store dtype and unit of ``modality``.

    Raises:
        InputError: naming ``source``, its dtype and observed range when they do not fit.
    """
    conversion = conversion or UnitConversion()
    if modality == "s1":
        return s1_to_db(pixels, nodata, source, conversion.s1_linear_to_db)
    return s2_to_dn(modality, pixels, nodata, source, conversion.s2_reflectance_scale)
