"""mirrors: deliver one URL's bytes into a resumable .part file (HTTP with retries, or file://).

HTTP goes through a requests Session, 1 MiB streaming, sha256 computed on the fly in a second
thread. A stalled mirror (no connection within connect_timeout, or no data for read_timeout, in
the headers or the body) fails after that ONE timeout: no urllib3 retry and no Range resume on the
same URL (kvmlab.source.fetch tries it again after the other mirrors). Cheap failures are retried
on the same URL: refused connections and 429/5xx by urllib3 Retry (backoff), a body cut off by an
HTTP Range resume (206 appends; 200 starts over). ``file://`` URLs are copied.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from queue import Queue
from typing import Any
from urllib.parse import unquote, urlsplit

from kvmlab import __version__
from kvmlab.core import ui
from kvmlab.core.errors import ConfigError
from kvmlab.core.fsutil import CHUNK

RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class FetchOptions:
    connect_timeout: float = 10.0  # no connection within this: the mirror stalled
    read_timeout: float = 30.0     # the stall timeout: no data for this long, the mirror stalled
    retries: int = 3               # urllib3 Retry: refused/reset/429/5xx retries per request
    backoff: float = 0.5           # urllib3 backoff_factor
    resume_attempts: int = 5       # Range resumes per URL after a cut-off body
    progress: bool | None = None   # None: rich bar on a terminal, plain lines otherwise

    @classmethod
    def from_env(cls, timeout: float | None = None) -> FetchOptions:
        """Defaults, overridden by KVMLAB_FETCH_TIMEOUT / KVMLAB_FETCH_RETRIES and a --timeout."""
        try:
            read = float(timeout or os.environ.get("KVMLAB_FETCH_TIMEOUT") or cls.read_timeout)
            retries = int(os.environ.get("KVMLAB_FETCH_RETRIES") or cls.retries)
        except ValueError as e:
            raise ConfigError(f"bad fetch setting: {e}",
                              hint="KVMLAB_FETCH_TIMEOUT is seconds, KVMLAB_FETCH_RETRIES a count")
        if read <= 0 or retries < 0:
            raise ConfigError("fetch timeout must be > 0 and retries >= 0")
        return cls(connect_timeout=min(cls.connect_timeout, read), read_timeout=read,
                   retries=retries)


class UrlFailed(Exception):
    """One URL did not deliver; the message is the reason shown to the user. stalled: it gave
    no connection or no data within the timeout (tried again only after the other mirrors)."""

    def __init__(self, reason: str, stalled: bool = False):
        super().__init__(reason)
        self.stalled = stalled


class Part:
    """The .part file being filled, with a running sha256 (resumable across runs)."""

    def __init__(self, path: Path, progress: Any):
        self.path, self.progress = path, progress
        self.h = hashlib.sha256()
        self.size = 0
        self.origins: list[str] = []  # where the bytes came from, in order (resumes, mirrors)
        if path.exists():
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.h.update(chunk)
                    self.size += len(chunk)
        if self.size:
            self.origins.append("an earlier, interrupted fetch")

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.h, self.size, self.origins = hashlib.sha256(), 0, []

    def write(self, chunks: Iterable[bytes], origin: str) -> None:
        """Append chunks; sha256 runs in a second thread (hashlib releases the GIL), so hashing
        overlaps receiving and writing. Every chunk written is hashed, even on errors."""
        queue: Queue[bytes | None] = Queue(maxsize=16)  # at most 16 MiB in flight
        hasher = threading.Thread(target=self._hash_from, args=(queue,), daemon=True)
        hasher.start()
        advance = self.progress.advance
        try:
            with open(self.path, "ab", buffering=0) as f:
                for chunk in chunks:
                    if origin not in self.origins[-1:]:
                        self.origins.append(origin)
                    f.write(chunk)
                    queue.put(chunk)
                    self.size += len(chunk)
                    advance(len(chunk))
        finally:
            queue.put(None)
            hasher.join()

    def _hash_from(self, queue: Queue) -> None:
        for chunk in iter(queue.get, None):
            self.h.update(chunk)


def _is_stall(e: BaseException) -> bool:
    """True when a requests/urllib3 error (or one it wraps) is a timeout: no connection within
    connect_timeout or no data within read_timeout. A refused connection is not one (urllib3's
    NewConnectionError is a ConnectTimeoutError subclass for backward compatibility)."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ReadTimeoutError
    todo: list[Any] = [e]
    seen: set[int] = set()
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ReadTimeoutError) or isinstance(x, ConnectTimeoutError) and \
                not isinstance(x, NewConnectionError):
            return True
        todo += [getattr(x, "reason", None), x.__cause__, x.__context__, *x.args]
    return False


def http_session(opts: FetchOptions) -> Any:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.exceptions import MaxRetryError
    from urllib3.util.retry import Retry

    class StallAwareRetry(Retry):
        """urllib3 Retry that gives up at once on a timeout: a stalled mirror costs one timeout,
        then the next mirror is tried (kvmlab comes back to it after the others)."""

        def increment(self, method: Any = None, url: Any = None, response: Any = None,
                      error: Any = None, _pool: Any = None, _stacktrace: Any = None) -> Any:
            if error is not None and _is_stall(error):
                raise MaxRetryError(_pool, url, reason=error) from error
            return super().increment(method, url, response, error, _pool, _stacktrace)

    retry = StallAwareRetry(total=opts.retries, connect=opts.retries, read=opts.retries,
                  status=opts.retries, backoff_factor=opts.backoff,
                  status_forcelist=RETRY_STATUS, allowed_methods=frozenset({"GET"}),
                  raise_on_status=False, respect_retry_after_header=False)
    s = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    # identity: the bytes on disk are the bytes of the file (no transparent gunzip of .tar.gz)
    s.headers.update({"User-Agent": f"kvmlab/{__version__}", "Accept-Encoding": "identity"})
    return s


def _reason(e: BaseException, opts: FetchOptions) -> str:
    """A short, user-facing reason for a requests/urllib3 failure."""
    text = str(e)
    if "ConnectTimeout" in type(e).__name__ or "ConnectTimeoutError" in text:
        return f"no connection within {opts.connect_timeout:g}s"
    if "timed out" in text.lower():
        return f"timed out: no data for {opts.read_timeout:g}s"
    if "refused" in text.lower():
        return "connection refused"
    if "NameResolutionError" in text or "Name or service not known" in text:
        return "cannot resolve the host name"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "connection cut off"
    return (text.splitlines() or [type(e).__name__])[0][:300]


def fetch_http(session: Any, url: str, part: Part, opts: FetchOptions) -> None:
    import requests
    import urllib3

    resumes = 0
    while True:
        headers = {"Range": f"bytes={part.size}-"} if part.size else {}
        try:
            r = session.get(url, headers=headers, stream=True,
                            timeout=(opts.connect_timeout, opts.read_timeout))
        except requests.RequestException as e:
            stalled = _is_stall(e)
            raise UrlFailed(_reason(e, opts) + (f" (after {part.size} bytes)" if stalled and
                                                 part.size else ""), stalled) from None
        with r:
            if r.status_code == 416 and part.size:
                part.reset()  # our .part is not a prefix of this file: start over
                continue
            if r.status_code == 200:
                part.reset()  # the server ignores Range: full download
            elif r.status_code != 206 or not _range_starts_at(r, part.size):
                raise UrlFailed(f"HTTP {r.status_code} {r.reason or ''}".rstrip())
            length = r.headers.get("Content-Length")
            part.progress.set_total(part.size + int(length) if length else None, part.size)
            before = part.size
            read1 = r.raw.read1  # returns what arrived: a cut-off body keeps its last bytes
            try:
                part.write(iter(partial(read1, CHUNK, decode_content=False), b""), url)
                return
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                reason = _reason(e, opts)
                if _is_stall(e):  # no Range resume on a stalled mirror: the next one resumes
                    raise UrlFailed(f"{reason} after {part.size} bytes", stalled=True) from None
        if part.size == before or resumes >= opts.resume_attempts:
            raise UrlFailed(f"{reason} after {part.size} bytes")
        resumes += 1
        ui.warn(f"{url}: {reason} at byte {part.size}; resuming with an HTTP Range request")


def _range_starts_at(r: Any, offset: int) -> bool:
    cr = r.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(cr.split()[1].split("-")[0]) == offset
    except (IndexError, ValueError):
        return False


def fetch_file_url(url: str, part: Part) -> None:
    path = Path(unquote(urlsplit(url).path))
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; only open() errors are the URL's
    except OSError as e:
        raise UrlFailed(f"{e.strerror}: {path}") from None
    with f:
        part.reset()
        part.progress.set_total(os.fstat(f.fileno()).st_size, 0)
        part.write(iter(partial(f.read, CHUNK), b""), url)
