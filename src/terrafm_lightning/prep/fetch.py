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
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import fsspec
import pyarrow.parquet as pq

from terrafm_lightning.prep.errors import InputError

T = TypeVar("T")

ATTEMPTS = 5
"""Tries of one remote read (the first and four retries)."""
FIRST_DELAY = 0.5
"""Seconds before the first retry; doubled at each further retry (0.5, 1, 2, 4: 7.5 s in all)."""
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
CHUNK_BYTES = 8 << 20
"""Bytes per ranged read of :func:`fetch_file` (a resumed fetch restarts at a chunk boundary)."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL read through fsspec (not a local path or ``file://``)."""
    return "://" in path and not path.startswith("file://")


def is_transient(err: BaseException) -> bool:
    """Whether a read failure is worth retrying (network trouble, overload, server errors)."""
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    if isinstance(err, FileNotFoundError | PermissionError | InputError):
        return False
    return isinstance(err, ConnectionError | TimeoutError | asyncio.TimeoutError | OSError) or (
        type(err).__module__.startswith("aiohttp")
    )


def describe(err: BaseException) -> str:
    """A one-line description of a read failure (HTTP status when there is one)."""
    status = getattr(err, "status", None)
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"HTTP {status}" if isinstance(status, int) else f"{type(err).__name__}: {text}"


def with_retries(
    call: Callable[[], T],
    what: str,
    attempts: int = ATTEMPTS,
    first_delay: float = FIRST_DELAY,
) -> T:
    """``call()``, retried with backoff on transient failures; other failures named at once.

    Args:
        call: the read.
        what: the URL or file read, for the error message.
        attempts: most tries.
        first_delay: seconds before the first retry (doubled each time).

    Raises:
        InputError: naming ``what`` and the failure.
    """
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
def open_input(path: str) -> Iterator[IO[bytes] | str]:
    """A local path as is, or a remote file opened for ranged reads (no read-ahead cache)."""
    if not is_remote(path):
        yield path.removeprefix("file://")
        return
    fs, inner = fsspec.core.url_to_fs(path)
    with fs.open(inner, "rb", cache_type="none") as f:
        yield f


@contextlib.contextmanager
def parquet_file(path: str) -> Iterator[pq.ParquetFile]:
    """A parquet file: memory-mapped when local; when remote, only its footer is read now.

    Row groups read later fetch their selected column chunks with one range request each.
    """
    with open_input(path) as source:
        if isinstance(source, str):
            yield pq.ParquetFile(source, memory_map=True)  # no copy of the file bytes
        else:
            yield pq.ParquetFile(source)


def read_bytes(url: str) -> bytes:
    """A whole (small) file, with retries."""

    def read() -> bytes:
        with open_input(url) as source:
            if isinstance(source, str):
                return Path(source).read_bytes()
            return source.read()

    return with_retries(read, url)


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
    done -= done % CHUNK_BYTES  # restart at a chunk boundary: a torn last write is redone
    with part.open("r+b" if part.exists() else "wb") as out:
        out.truncate(done)
        out.seek(done)
        while size is None or done < size:
            chunk = with_retries(lambda: _read_range(url, done, CHUNK_BYTES), url)
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


def _read_range(url: str, start: int, length: int) -> bytes:
    fs, inner = fsspec.core.url_to_fs(url)
    return fs.cat_file(inner, start=start, end=start + length)
