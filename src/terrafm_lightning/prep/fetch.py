"""Reading remote inputs through fsspec: bounded retries, parquet row groups, verified files.

Every remote read goes through :func:`with_retries`: transient failures (connection errors,
timeouts, HTTP 408/425/429/5xx) are retried with exponential backoff a bounded number of times;
anything else, or the last failure, becomes an :class:`~terrafm_lightning.prep.errors.InputError`
naming the URL. Local paths (no ``scheme://``, or ``file://``) are read directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from functools import lru_cache, partial
from pathlib import Path
from typing import IO, TypeVar

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.http import HTTPFileSystem

from terrafm_lightning.prep.errors import InputError

T = TypeVar("T")

ATTEMPTS = 5
"""Tries of one remote read (the first and four retries)."""
FIRST_DELAY = 0.5
"""Seconds before the first retry; doubled at each further retry (0.5, 1, 2, 4: 7.5 s in all)."""
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 8 << 20
"""Bytes per ranged read of :func:`fetch_file` (what a kill can lose is resumed from the end of
the bytes written: they are a prefix of the file)."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL read through fsspec (not a local path or ``file://``)."""
    return "://" in path and not path.startswith("file://")


def _status(err: BaseException) -> int | None:
    """The HTTP status behind a failure, also when fsspec wrapped it (``raise ... from``)."""
    seen: BaseException | None = err
    while seen is not None:
        status = getattr(seen, "status", None)  # aiohttp's ClientResponseError
        if isinstance(status, int):
            return status
        seen = seen.__cause__
    return None


def is_transient(err: BaseException) -> bool:
    """Whether a read failure is worth retrying (network trouble, overload, server errors)."""
    status = _status(err)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(err, FileNotFoundError | PermissionError | InputError):
        # fsspec's HTTP ``info`` turns any failure into FileNotFoundError: look at the cause.
        return err.__cause__ is not None and is_transient(err.__cause__)
    return isinstance(err, ConnectionError | TimeoutError | asyncio.TimeoutError | OSError) or (
        type(err).__module__.startswith("aiohttp")
    )


def describe(err: BaseException) -> str:
    """A one-line description of a read failure (HTTP status when there is one)."""
    status = _status(err)
    if status is not None:
        return f"HTTP {status}"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"{type(err).__name__}: {text}"


def with_retries(
    call: Callable[[], T],
    what: str,
    attempts: int | None = None,
    first_delay: float | None = None,
) -> T:
    """``call()``, retried with backoff on transient failures; other failures named at once.

    Args:
        call: the read.
        what: the URL or file read, for the error message.
        attempts: most tries (default :data:`ATTEMPTS`).
        first_delay: seconds before the first retry, doubled each time (default
            :data:`FIRST_DELAY`).

    Raises:
        InputError: naming ``what`` and the failure.
    """
    attempts = ATTEMPTS if attempts is None else attempts
    first_delay = FIRST_DELAY if first_delay is None else first_delay
    for attempt in range(attempts):
        try:
            return call()
        except InputError:
            raise
        except Exception as err:
            if not is_transient(err):
                raise InputError(f"cannot read {what}: {describe(err)}") from err
            if attempt == attempts - 1:
                raise InputError(
                    f"cannot read {what}: {describe(err)} (after {attempts} tries; check the "
                    "URL and the network, then run the same command again to resume)"
                ) from err
            time.sleep(first_delay * 2**attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def parquet_file(path: str) -> Iterator[pq.ParquetFile]:
    """A parquet file: memory-mapped when local; when remote, opened for ranged reads.

    A remote file's footer is read once per process (:func:`remote_footer`); its row groups
    read later fetch just their selected column chunks, one range request each.
    """
    if not is_remote(path):
        yield pq.ParquetFile(path.removeprefix("file://"), memory_map=True)  # no copy
        return
    size, metadata = remote_footer(path)
    with _open_remote(path, size) as f:
        yield pq.ParquetFile(f, metadata=metadata)


@contextlib.contextmanager
def _open_remote(url: str, size: int | None = None) -> Iterator[IO[bytes]]:
    """``url`` opened without read-ahead (each read one range request), its size if known."""
    fs, inner = fsspec.core.url_to_fs(url)
    known = {"size": size} if size is not None and isinstance(fs, HTTPFileSystem) else {}
    with fs.open(inner, "rb", cache_type="none", **known) as f:
        yield f


@lru_cache(maxsize=64)
def remote_footer(url: str) -> tuple[int, pq.FileMetaData]:
    """Size and metadata of a remote parquet file: two ranged reads of exactly its footer.

    pyarrow alone would read the last 64 KiB, which can hold row groups nobody asked for.
    """
    with _open_remote(url) as f:
        size = f.size
        f.seek(size - 8)
        tail = f.read(8)
        if len(tail) != 8 or tail[4:] != b"PAR1":
            raise InputError(f"{url} is not a parquet file (no PAR1 footer)")
        length = int.from_bytes(tail[:4], "little")
        if length + 12 > size:
            raise InputError(f"{url}: footer of {length} bytes in a {size}-byte file (truncated?)")
        f.seek(size - 8 - length)
        footer = f.read(length)
    return size, pq.read_metadata(io.BytesIO(b"PAR1" + footer + tail))


def read_bytes(url: str) -> bytes:
    """A whole (small) file, with retries."""
    fs, inner = fsspec.core.url_to_fs(url)
    return with_retries(lambda: fs.cat_file(inner), url)


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a local file (``md5`` or ``sha256``)."""
    digest = hashlib.new(algorithm)
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fetch_file(
    url: str,
    dest: Path,
    checksum: str,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Download ``url`` to ``dest`` and verify it; resumable, idempotent.

    Bytes go to ``dest.part`` first, with ranged reads from where an interrupted fetch stopped;
    ``dest`` appears (renamed) only once the whole file matches ``checksum``.

    Args:
        url: the file (http(s)://, s3://, a local path...).
        dest: where it lands.
        checksum: ``"md5:<hex>"`` or ``"sha256:<hex>"``.
        progress: called with the number of bytes of each chunk read.

    Returns:
        Whether anything was downloaded (False: ``dest`` was already there and verified).

    Raises:
        InputError: the source is unreadable, or the file does not match ``checksum`` (the bad
            file is removed so that the next run fetches it again).
    """
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ("md5", "sha256") or not expected:
        raise InputError(f"{url}: checksum {checksum!r} is not 'md5:<hex>' or 'sha256:<hex>'")
    if dest.is_file() and file_digest(dest, algorithm) == expected:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    fs, inner = fsspec.core.url_to_fs(url)
    size = with_retries(lambda: fs.size(inner), url)
    done = part.stat().st_size if part.is_file() else 0
    if size is not None and done > size:
        part.unlink()  # not a prefix of this file
        done = 0
    with part.open("r+b" if part.exists() else "wb") as out:
        out.truncate(done)
        out.seek(done)
        while size is None or done < size:
            chunk = with_retries(partial(fs.cat_file, inner, done, done + CHUNK_BYTES), url)
            if not chunk:
                break
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(len(chunk))
    got = file_digest(part, algorithm)
    if got != expected:
        part.unlink()
        raise InputError(
            f"{url}: {algorithm} {got} does not match the published {expected} (the download "
            "was removed; run again to fetch it anew, or report a changed upstream file)"
        )
    os.replace(part, dest)
    return True
