"""Byte counts of tensors: live storages during a step (:class:`LiveBytes`) and held state."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Bytes of the live storages that ops create (fake or real tensors), and their peak.

    A storage is counted once, when an op first returns it, and uncounted when it dies.
    Storages that :meth:`mark_gradient` names count as gradients, weighted by
    ``gradient_share`` in :attr:`peak` (the share of the gradients a device keeps).
    """

    def __init__(self, gradient_share: float = 1.0) -> None:
        super().__init__()
        self.gradient_share = gradient_share
        self._sizes: dict[int, int] = {}
        self._gradients: set[int] = set()
        self.other = self.gradients = 0
        self.peak = self.peak_other = 0.0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for tensor in tree_leaves(out):
            # In-place ops and views return their input's storage: not a new one.
            if _has_storage(tensor) and id(tensor.untyped_storage()) not in inputs:
                self._add(tensor.untyped_storage())
        self._update()
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.other += storage.nbytes()
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key)
        if key in self._gradients:
            self._gradients.remove(key)
            self.gradients -= size
        else:
            self.other -= size

    def _update(self) -> None:
        self.peak = max(self.peak, self.other + self.gradient_share * self.gradients)
        self.peak_other = max(self.peak_other, self.other)

    def mark_gradient(self, gradient: Tensor) -> None:
        """Count ``gradient``'s storage (made during the step) as a gradient from now on."""
        key = id(gradient.untyped_storage())
        if key in self._sizes and key not in self._gradients:
            self._gradients.add(key)
            self.other -= self._sizes[key]
            self.gradients += self._sizes[key]
            self._update()


def _has_storage(value: object) -> bool:
    """A tensor with a dense storage to count."""
    return isinstance(value, Tensor) and not value.is_sparse


def tensor_bytes(tensors: Iterator[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    sizes = {id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}
    return sum(sizes.values())
