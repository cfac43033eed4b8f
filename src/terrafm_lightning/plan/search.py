"""The largest batch that fits a memory budget, from few measured step peaks."""

from __future__ import annotations

from collections.abc import Callable, Mapping

MAX_BATCH = 1 << 16
"""Largest per-device batch the plan searches."""


def largest_batch(peak: Callable[[int], float], usable: float, known: Mapping[int, float]) -> int:
    """The largest batch ``b`` with ``peak(b) <= usable`` (0 if none), for an increasing peak.

    The peak is close to linear in the batch: the secant through the two measured batches
    nearest the limit predicts it, and the prediction is checked at ``b`` (and at ``b + 1`` if
    ``b`` fits); a bisection finishes any rest. ``known`` holds peaks already measured, by batch.
    """
    points = dict(known) or {1: peak(1)}
    for batch in list(points):
        points.setdefault(8 * batch, peak(8 * batch))

    def bounds() -> tuple[int, int | None]:
        fitting = [b for b, value in points.items() if value <= usable]
        too_big = [b for b, value in points.items() if value > usable]
        return max(fitting, default=0), min(too_big, default=None)

    low, high = bounds()
    for _ in range(3):
        if high == low + 1 or (high is None and low >= MAX_BATCH):
            return low
        if low and high:
            first, last = low, high
        else:
            first, last = sorted(points)[-2:] if low else sorted(points)[:2]
        slope = (points[last] - points[first]) / (last - first)
        guess = first + int((usable - points[first]) // slope) if slope > 0 else 2 * max(low, 1)
        guess = max(min(guess, MAX_BATCH - 1, high - 1 if high else MAX_BATCH), low, 1)
        for batch in (guess, guess + 1):
            if batch not in points:
                points[batch] = peak(batch)
            if points[batch] > usable:
                break
        low, high = bounds()
    high = high or MAX_BATCH + 1
    while high - low > 1:
        middle = (low + high) // 2
        points[middle] = peak(middle)
        low, high = (middle, high) if points[middle] <= usable else (low, middle)
    return low
