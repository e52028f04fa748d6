"""A loopback HTTP server for fetch tests and benchmarks (127.0.0.1, ephemeral port, threads).

Files are served under /<mode>/<name>; the mode decides how the server behaves:

    normal   200 with the whole file; ignores Range
    range    honours "Range: bytes=N-" / "bytes=N-M" with 206 (416 when out of range)
    cut      like range, but the first full GET of each file sends half the body and drops the
             connection (once per file and server)
    missing  404
    wrong    200 with different bytes of the same length
    slow     waits `slow_seconds` before answering (longer than the client's read timeout)
    flaky    503 on the first request for each file, then like range
    stall    like range, but every response sends only the first `stall_after` bytes of its body
             (headers complete), then nothing: the connection stays open until the server closes

Usage:
    with LoopbackServer({"x.tar.gz": data_or_path}) as srv:
        srv.url("cut", "x.tar.gz"); srv.requests -> [(mode, name, range_header_or_None, status)]
        srv.times -> time.monotonic() at which each of srv.requests arrived (same order)
File content may be bytes or a Path (served with sendfile, for large benchmark files).
"""
from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODES = ("normal", "range", "cut", "missing", "wrong", "slow", "flaky", "stall")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server.owner
        parts = self.path.lstrip("/").split("/", 1)
        mode, name = (parts + [""])[:2]
        rng = self.headers.get("Range")
        content = srv.files.get(name)
        if mode not in MODES or content is None or mode == "missing":
            return self._reply(mode, name, rng, 404, b"not found\n")
        if mode == "slow":
            srv.record(mode, name, rng, 0)
            if srv.stop.wait(srv.slow_seconds):
                return
        size = content.stat().st_size if isinstance(content, Path) else len(content)
        key = (mode, name)
        with srv.lock:
            first = key not in srv.seen
            srv.seen.add(key)
        if mode == "flaky" and first:
            return self._reply(mode, name, rng, 503, b"try again\n")
        start, end, status = 0, size, 200
        if rng and mode in ("range", "cut", "flaky", "stall"):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m or int(m.group(1)) >= size:
                return self._reply(mode, name, rng, 416, b"", {"Content-Range": f"bytes */{size}"})
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
        srv.record(mode, name, rng, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        self.wfile.flush()
        if mode == "cut" and first and status == 200:
            end = start + (end - start) // 2
            self._send(content, start, end)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if mode == "stall":
            self._send(content, start, min(end, start + srv.stall_after))
            self.wfile.flush()
            srv.stop.wait()  # no more data, connection open, until the server closes
            self.close_connection = True
            return
        if mode == "wrong":
            data = bytes(b ^ 0xFF for b in _read(content, 0, min(size, 4096))) + \
                _read(content, min(size, 4096), size)
            self.wfile.write(data)
            return
        self._send(content, start, end)

    def _send(self, content, start: int, end: int) -> None:
        try:
            if isinstance(content, Path):
                with open(content, "rb") as f:
                    self.connection.sendfile(f, start, end - start)
            else:
                self.wfile.write(content[start:end])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _reply(self, mode, name, rng, status: int, body: bytes, headers: dict | None = None):
        self.server.owner.record(mode, name, rng, status)
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _read(content, start: int, end: int) -> bytes:
    if isinstance(content, Path):
        with open(content, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    return content[start:end]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class LoopbackServer:
    def __init__(self, files: dict[str, bytes | Path] | None = None, slow_seconds: float = 30.0,
                 stall_after: int = 10):
        self.files: dict[str, bytes | Path] = dict(files or {})
        self.slow_seconds = slow_seconds
        self.stall_after = stall_after
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.times: list[float] = []
        self.seen: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def record(self, mode: str, name: str, rng: str | None, status: int) -> None:
        with self.lock:
            self.requests.append((mode, name, rng, status))
            self.times.append(time.monotonic())

    def url(self, mode: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/{name}"

    def start(self) -> LoopbackServer:
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        kwargs={"poll_interval": 0.05})
        self._thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening (for "connection refused" mirrors)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Blackhole:
    """A 127.0.0.1 port where a TCP connection never completes (a listener with backlog 0 whose
    only queue slot is taken; the kernel drops further SYNs): a mirror that gives no connection.

        with Blackhole() as bh: bh.url("x.tar.gz")
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._filler = socket.socket()
        self.port = 0

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def __enter__(self) -> Blackhole:
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.port = self._listener.getsockname()[1]
        self._filler.connect(("127.0.0.1", self.port))  # takes the one slot, never accepted
        return self

    def __exit__(self, *exc) -> None:
        self._filler.close()
        self._listener.close()
