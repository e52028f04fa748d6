"""fetch: a recipe's source tarball into the content-addressed cache, verified by sha256.

- Mirrors are tried in order; a URL that fails (404, refused, timeout, cut off for good) is
  reported and the next one is tried; the final error lists every URL with its reason.
- HTTP through a requests Session with urllib3 Retry (backoff; 429/5xx retried), connect/read
  timeouts, 1 MiB streaming, sha256 computed on the fly in a second thread. An interrupted body
  is resumed with an HTTP Range request (206 appends; 200 starts over) from the .part file in
  <cache>/sources/.partial/, in the same run or the next one. ``file://`` URLs are copied.
- Verified files live at <cache>/sources/<sha256>/<file>. The expected sha256 is the recipe's
  pin or, for ``sha256 = "unknown"``, the entry in the lock file (kvmlab.lock, JSON, keyed
  "recipe/file"). The first fetch of an unknown source records it there with a loud warning
  (like go.sum). A mismatch is a ChecksumError (expected, got, URL); the bytes are deleted and
  never enter the cache.
- ``offline``: cache only. ``source=PATH``: a local tarball (verified and cached like a download) or
  a directory (used as is; its content hash is recorded instead).
The result is stamped in <work>/<recipe>/fetch.json.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import os
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Queue
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

from . import __version__, ui
from .config import Settings
from .errors import ChecksumError, ConfigError, FetchError
from .fsutil import CHUNK, atomic_write_json, read_json, sha256_file, tree_sha256
from .recipe import Recipe
from .srpm import is_srpm

RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class FetchOptions:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0     # seconds without data before a URL counts as timed out
    retries: int = 3               # urllib3 Retry: connect/read/status retries per request
    backoff: float = 0.5           # urllib3 backoff_factor
    resume_attempts: int = 5       # Range resumes per URL after a cut-off body
    progress: bool | None = None   # None: rich bar on a terminal, plain lines otherwise

    @classmethod
    def from_env(cls, timeout: float | None = None) -> "FetchOptions":
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


@dataclass(frozen=True)
class FetchResult:
    recipe: str
    file: str
    kind: str      # "tarball" | "dir"
    path: Path     # the verified tarball in the cache, or the --source directory
    sha256: str
    size: int      # bytes (tarball) or 0 (dir)
    origin: str    # the URL (or local path) the bytes came from
    status: str    # "downloaded" | "cached" | "local"
    check: str     # "pinned" | "locked" | "locked now" | "dir hash"

    def stamp(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        del d["status"]
        return d


class _UrlFailed(Exception):
    """One URL did not deliver; the message is the reason shown to the user."""


# -- lock file ------------------------------------------------------------------------------------

def lock_key(recipe: Recipe) -> str:
    return f"{recipe.name}/{recipe.source.file}"


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path, {})
    except ValueError as e:
        raise FetchError(f"lock file {path} is not valid JSON: {e}",
                         hint="fix or delete it (entries are re-recorded on the next fetch)")
    if not isinstance(data, dict) or not isinstance(data.get("sources", {}), dict):
        raise FetchError(f"lock file {path} has an unexpected layout",
                         hint='expected {"sources": {"recipe/file": {"sha256": ...}}}')
    return data


def expected_sha256(settings: Settings, recipe: Recipe) -> tuple[str | None, str]:
    """(sha256, "pinned" | "locked") or (None, "unknown") when neither pinned nor locked yet."""
    if recipe.source.pinned:
        return recipe.source.sha256, "pinned"
    entry = _read_lock(settings.lock).get("sources", {}).get(lock_key(recipe))
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return entry["sha256"], "locked"
    return None, "unknown"


def _record_lock(settings: Settings, recipe: Recipe, sha: str, origin: str) -> None:
    data = _read_lock(settings.lock)
    data.setdefault("comment", "source checksums recorded on first fetch by kvmlab (like go.sum); "
                               "commit this file, every later fetch must match")
    data.setdefault("sources", {})[lock_key(recipe)] = {
        "sha256": sha, "url": origin,
        "recorded": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    atomic_write_json(settings.lock, data)
    ui.warn(f"[bold]{recipe.source.file} has no pinned sha256: recorded {sha} (from {origin}) in "
            f"{settings.lock}[/bold]. Check it against a trusted source; every later fetch must "
            f"match it.")


# -- downloading ----------------------------------------------------------------------------------

def cache_path(settings: Settings, sha: str, file: str) -> Path:
    return settings.sources_cache / sha / file


class _Part:
    """The .part file being filled, with a running sha256 (resumable across runs)."""

    def __init__(self, path: Path, progress: Any):
        self.path, self.progress = path, progress
        self.h = hashlib.sha256()
        self.size = 0
        if path.exists():
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.h.update(chunk)
                    self.size += len(chunk)

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.h, self.size = hashlib.sha256(), 0

    def write(self, chunks: Iterable[bytes]) -> None:
        """Append chunks; sha256 runs in a second thread (hashlib releases the GIL), so hashing
        overlaps receiving and writing. Every chunk written is hashed, even on errors."""
        queue: Queue[bytes | None] = Queue(maxsize=16)  # at most 16 MiB in flight
        hasher = threading.Thread(target=self._hash_from, args=(queue,), daemon=True)
        hasher.start()
        advance = self.progress.advance
        try:
            with open(self.path, "ab", buffering=0) as f:
                for chunk in chunks:
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


def _session(opts: FetchOptions) -> Any:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=opts.retries, connect=opts.retries, read=opts.retries,
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


def _fetch_http(session: Any, url: str, part: _Part, opts: FetchOptions) -> None:
    import requests
    import urllib3

    resumes = 0
    while True:
        headers = {"Range": f"bytes={part.size}-"} if part.size else {}
        try:
            r = session.get(url, headers=headers, stream=True,
                            timeout=(opts.connect_timeout, opts.read_timeout))
        except requests.RequestException as e:
            raise _UrlFailed(_reason(e, opts)) from None
        with r:
            if r.status_code == 416 and part.size:
                part.reset()  # our .part is not a prefix of this file: start over
                continue
            if r.status_code == 200:
                part.reset()  # the server ignores Range: full download
            elif r.status_code != 206 or not _range_starts_at(r, part.size):
                raise _UrlFailed(f"HTTP {r.status_code} {r.reason or ''}".rstrip())
            length = r.headers.get("Content-Length")
            part.progress.set_total(part.size + int(length) if length else None, part.size)
            before = part.size
            read1 = r.raw.read1  # returns what arrived: a cut-off body keeps its last bytes
            try:
                part.write(iter(lambda: read1(CHUNK, decode_content=False), b""))
                return
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                reason = _reason(e, opts)
        if part.size == before or resumes >= opts.resume_attempts:
            raise _UrlFailed(f"{reason} after {part.size} bytes")
        resumes += 1
        ui.warn(f"{url}: {reason} at byte {part.size}; resuming with an HTTP Range request")


def _range_starts_at(r: Any, offset: int) -> bool:
    cr = r.headers.get("Content-Range", "")  # "bytes START-END/TOTAL"
    try:
        return int(cr.split()[1].split("-")[0]) == offset
    except (IndexError, ValueError):
        return False


def _fetch_file_url(url: str, part: _Part) -> None:
    path = Path(unquote(urlsplit(url).path))
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _UrlFailed(f"{e.strerror}: {path}") from None
    with f:
        part.reset()
        part.progress.set_total(os.fstat(f.fileno()).st_size, 0)
        part.write(iter(lambda: f.read(CHUNK), b""))


def _download(settings: Settings, recipe: Recipe, urls: list[str], expected: str | None,
              check: str, opts: FetchOptions) -> FetchResult:
    file = recipe.source.file
    failures: list[str] = []
    session = None
    part_path = settings.sources_cache / ".partial" / f"{file}.part"
    try:
        part_path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{part_path}.lock", "w") as lock, \
                ui.progress(f"fetch {file}", enabled=opts.progress) as prog:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per .part (parallel kvmlab runs)
            part = _Part(part_path, prog)
            for url in urls:
                ui.info(f"[dim]fetching {url}[/dim]")
                try:
                    if url.startswith("file://"):
                        _fetch_file_url(url, part)
                    else:
                        session = session or _session(opts)
                        _fetch_http(session, url, part, opts)
                except _UrlFailed as e:
                    failures.append(f"{url}: {e}")
                    ui.warn(f"{url}: {e}" + ("; trying the next mirror" if url != urls[-1] else ""))
                    continue
                return _store(settings, recipe, part, url, expected, check)
    except OSError as e:  # the local side: cache dir not writable, disk full, ...
        raise FetchError(f"cannot write {part_path}: {e.strerror or e}",
                         hint="check free space and permissions of the cache (KVMLAB_CACHE)")
    finally:
        if session is not None:
            session.close()
    raise FetchError(f"could not fetch {file} from any of its {len(failures)} URL(s): " +
                     "; ".join(failures),
                     hint="check the network/proxy, add a mirror to the recipe, or use "
                          "--source PATH with a local copy of the tarball")


def _store(settings: Settings, recipe: Recipe, part: _Part, url: str, expected: str | None,
           check: str) -> FetchResult:
    got = part.h.hexdigest()
    if expected and got != expected:
        part.path.unlink(missing_ok=True)
        raise ChecksumError(
            f"sha256 mismatch for {recipe.source.file} from {url}: expected {expected} ({check}), "
            f"got {got}; the downloaded copy was deleted, nothing was cached",
            hint="a corrupt or truncated mirror, a different release under the same name, or "
                 "tampering. If the " + ("recipe's pin" if check == "pinned" else
                                         f"entry in {settings.lock}") + " is wrong, fix it")
    dest = cache_path(settings, got, recipe.source.file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = part.size
    os.replace(part.path, dest)
    if not expected:
        _record_lock(settings, recipe, got, url)
        check = "locked now"
    return FetchResult(recipe.name, recipe.source.file, "tarball", dest, got, size, url,
                       "downloaded", check)


# -- entry point ----------------------------------------------------------------------------------

def stamp_path(settings: Settings, recipe: Recipe) -> Path:
    return settings.work(recipe.name) / "fetch.json"


def fetch_source(settings: Settings, recipe: Recipe, *, source: str | Path | None = None,
                 offline: bool = False, force: bool = False,
                 options: FetchOptions | None = None) -> FetchResult:
    """Make the recipe's source available locally, verified; stamp <work>/fetch.json.

    force: download again even when the cache has the file (the cache is always re-hashed).
    """
    opts = options or FetchOptions.from_env()
    result = _fetch(settings, recipe, source, offline, force, opts)
    stamp = stamp_path(settings, recipe)
    try:
        current = read_json(stamp)
    except ValueError:
        current = None
    if current != result.stamp():
        atomic_write_json(stamp, result.stamp())
    return result


def _fetch(settings: Settings, recipe: Recipe, source: str | Path | None, offline: bool,
           force: bool, opts: FetchOptions) -> FetchResult:
    file = recipe.source.file
    if source:
        p = Path(source).expanduser().resolve()
        if p.is_dir():
            return FetchResult(recipe.name, file, "dir", p, tree_sha256(p), 0, str(p), "local",
                               "dir hash")
        if not p.is_file():
            raise FetchError(f"--source {source}: no such file or directory",
                             hint="give a tarball of the sources or an unpacked source directory")
        if recipe.source.format == "srpm" and not is_srpm(p):
            # a plain (already %prep'ed) tree tarball for an srpm recipe: hashed, never locked
            # as the source RPM's checksum
            return FetchResult(recipe.name, p.name, "tarball", p, sha256_file(p),
                               p.stat().st_size, str(p), "local", "local tree")
    expected, check = expected_sha256(settings, recipe)
    if source:  # always hashed: it must be the pinned/locked tarball
        r = _download(settings, recipe, [p.as_uri()], expected, check, opts)
        return replace(r, origin=str(p), status="local")
    if expected and not force:
        cached = cache_path(settings, expected, file)
        if cached.is_file():
            if sha256_file(cached) == expected:
                return FetchResult(recipe.name, file, "tarball", cached, expected,
                                   cached.stat().st_size, str(cached), "cached", check)
            cached.unlink()
            ui.warn(f"cached {cached} was corrupt (sha256 differs); removed it")
    if offline:
        where = cache_path(settings, expected, file) if expected else settings.sources_cache
        raise FetchError(
            f"offline: {file} is not in the cache ({where})" if expected else
            f"offline: {file} has no pinned or locked sha256 yet, so no cached copy can be trusted",
            hint=f"run `invoke fetch --recipe {recipe.name}` once with network access, or use "
                 "--source PATH with a local copy")
    return _download(settings, recipe, list(recipe.source.urls), expected, check, opts)
