"""Pairing co-registered inputs by location key, shared by the ``geotiff`` and ``majortom`` sources.

A location is kept when it has every modality (or any, with ``require_all`` False); each input of
a location lacking a modality is listed on one line, so nothing is dropped or paired silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from terrafm_lightning.prep.errors import InputError


def pair_inputs(
    found: Mapping[str, Mapping[str, str]],
    modalities: Sequence[str],
    require_all: bool,
    where: str,
    hint: str,
) -> tuple[list[str], list[str]]:
    """Keys to write (sorted) and one note per input of an incomplete location.

    Args:
        found: location key -> modality -> the input's name (file, or file and row).
        modalities: the modalities asked for.
        require_all: keep only locations with every modality.
        where: the inputs' place, for the error message.
        hint: how the user can make the names pair, for the error message.

    Raises:
        InputError: when no location is left to write.
    """
    partial_keys = [k for k in sorted(found) if len(found[k]) < len(modalities)]
    action = "left out" if require_all else "kept (--allow-missing)"
    notes = []
    for key in partial_keys:
        missing = ", ".join(m for m in modalities if m not in found[key])
        notes += [f"unpaired ({action}, no {missing}): {name}" for name in found[key].values()]
    keys = [k for k in sorted(found) if not require_all or k not in set(partial_keys)]
    if not keys:
        unpaired = sum(len(found[k]) for k in partial_keys)
        raise InputError(
            f"no location {where} has all of {', '.join(modalities)} ({unpaired} unpaired "
            f"inputs): {hint}, or pass --allow-missing"
        )
    return keys, notes
