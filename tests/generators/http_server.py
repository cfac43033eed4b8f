"""A loopback HTTP file server honouring Range requests, counting what it serves, with faults.

``serve(folder)`` runs Python's ``http.server`` in a thread on 127.0.0.1 and yields a
:class:`LoopbackServer`: its ``url``, the ``log`` of every request (method, path, byte range,
bytes sent, status) and fault switches: ``fail[path] = n`` answers the next ``n`` requests of
``path`` with ``status`` (503 by default), ``cut[path] = n`` sends only the first ``n`` bytes of
the next GET of ``path`` then closes the connection (an interrupted transfer), ``delay`` sleeps
before each answer.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Served:
    """One request: method, path, byte range [start, end) (None: whole file), bytes, status."""

    method: str
    path: str
    start: int | None
    end: int | None
    sent: int
    status: int


@dataclass
class LoopbackServer:
    """State shared with the handler threads."""

    root: Path
    url: str = ""
    log: list[Served] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    status: int = 503
    cut: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, path: str | None = None, method: str | None = None) -> list[Served]:
        """Logged requests, optionally of one path (``/a/b``) and method."""
        with self.lock:
            return [
                s
                for s in self.log
                if (path is None or s.path == path) and (method is None or s.method == method)
            ]

    def bytes_sent(self, prefix: str = "/") -> int:
        """Body bytes sent for paths starting with ``prefix``."""
        return sum(s.sent for s in self.requests() if s.path.startswith(prefix))

    def clear(self) -> None:
        """Forget the log."""
        with self.lock:
            self.log.clear()


class _Handler(SimpleHTTPRequestHandler):
    state: LoopbackServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _record(self, start: int | None, end: int | None, sent: int, status: int) -> None:
        with self.state.lock:
            self.state.log.append(Served(self.command, self.path, start, end, sent, status))

    def _answer(self, body: bool) -> None:
        state = self.state
        if state.delay:
            time.sleep(state.delay)
        with state.lock:
            failing = state.fail.get(self.path, 0)
            if failing:
                state.fail[self.path] = failing - 1
            cut = state.cut.pop(self.path, None) if body else None
        if failing:
            self.send_error(state.status)
            self._record(None, None, 0, state.status)
            return
        file = state.root / self.path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            self._record(None, None, 0, 404)
            return
        data = file.read_bytes()
        size = len(data)
        start, end, status = 0, size, 200
        if match := _RANGE.match(self.headers.get("Range", "")):
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last) + 1 if last else size, size)
            else:
                start, end = max(size - int(last), 0), size
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.end_headers()
                self._record(start, None, 0, 416)
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        sent = 0
        if body:
            chunk = data[start:end] if cut is None else data[start : start + cut]
            self.wfile.write(chunk)
            sent = len(chunk)
            if cut is not None:
                self.close_connection = True
        self._record(start if status == 206 else None, end if status == 206 else None, sent, status)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(False)


@contextlib.contextmanager
def serve(root: Path) -> Iterator[LoopbackServer]:
    """Serve ``root`` on 127.0.0.1 (a free port) for the duration of the block."""
    state = LoopbackServer(Path(root))
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
