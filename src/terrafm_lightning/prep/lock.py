"""One writer per store: a lock object ``<store>.lock`` beside the store, with a heartbeat.

Written by hand: fsspec has no cross-backend lock and object stores have no atomic
create-if-absent that s3fs exposes. The lock lives beside the store (not inside it) so zarr never
lists it as a foreign object. It records a run id, host, pid and a heartbeat time that the driver
refreshes at every flush. A lock is stale (taken over) when its process is gone on this host or
its heartbeat is older than :data:`STALE_SECONDS`; a ``kill -9`` therefore never blocks the
resume. Two runs starting in the same instant are told apart by reading the lock back.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec

from terrafm_lightning.prep.errors import PrepError
from terrafm_lightning.store.format import StoreError, require_store

STALE_SECONDS = 600.0
"""A lock whose heartbeat is older than this is taken over (its writer is presumed dead)."""


def lock_path(path: str) -> str:
    """The lock object of the store at ``path``."""
    return path.rstrip("/") + ".lock"


class StoreLock:
    """The write lock of one store, held by this process."""

    def __init__(self, path: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.path = path
        self.fs, self.file = fsspec.core.url_to_fs(lock_path(path), **dict(storage_options or {}))
        self.run_id = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()

    def _read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.file, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as stale

    def _alive(self, holder: Mapping[str, Any]) -> bool:
        if not holder or time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS:
            return False
        if holder.get("host") == self.host:
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True

    def beat(self) -> None:
        """Write (or refresh) the lock with the current time."""
        record = {"run_id": self.run_id, "host": self.host, "pid": self.pid}
        try:
            self.fs.makedirs(posixpath.dirname(self.file), exist_ok=True)
            with self.fs.open(self.file, "w") as f:
                json.dump({**record, "heartbeat": time.time()}, f)
        except OSError as err:
            raise StoreError(f"cannot write store at {self.path}: {err}") from err

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            PrepError: naming the store and the other writer when a live run holds it.
        """
        holder = self._read()
        if holder is not None and self._alive(holder):
            raise PrepError(self._busy(holder))
        self.beat()
        if (holder := self._read()) and holder.get("run_id") != self.run_id:
            raise PrepError(self._busy(holder))

    def _busy(self, holder: Mapping[str, Any]) -> str:
        age = time.time() - float(holder.get("heartbeat", 0))
        return (
            f"{self.path} is being written by another run (pid {holder.get('pid')} on "
            f"{holder.get('host')}, last seen {age:.0f} s ago); wait for it to finish, or delete "
            f"{lock_path(self.path)} if that run is dead"
        )

    def release(self) -> None:
        """Remove the lock if this process still holds it."""
        holder = self._read()
        if holder and holder.get("run_id") == self.run_id:
            self.fs.rm(self.file)


@contextlib.contextmanager
def store_lock(
    path: str, storage_options: Mapping[str, Any] | None = None, existing: bool = False
) -> Iterator[StoreLock]:
    """Hold the write lock of the store at ``path`` for the duration of the block.

    Args:
        path: the store.
        storage_options: fsspec options of the store.
        existing: the store must exist already (checked before anything is written).

    Raises:
        StoreError: when ``existing`` and there is no store at ``path``.
        PrepError: when another live run holds the lock.
    """
    if existing:
        require_store(path, storage_options)
    lock = StoreLock(path, storage_options)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
