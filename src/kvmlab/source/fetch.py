"""fetch: a recipe's source tarball into the content-addressed cache, verified by sha256.

- Mirrors are tried in order; a URL that fails (404, refused, cut off for good) is reported and
  the next one is tried; the final error lists every URL with its reason.
- A stalled mirror (no connection within connect_timeout, or no data for read_timeout = the
  stall timeout, in the headers or the body) is left after that ONE timeout: no urllib3 retry
  and no Range resume on the same URL. It is tried once more only after every other mirror has
  been tried. Cheap failures are retried on the same URL as before: refused connections and
  429/5xx by urllib3 Retry (backoff), a body cut off by a Range resume.
- HTTP through a requests Session, 1 MiB streaming, sha256 computed on the fly in a second
  thread. An interrupted body is resumed with an HTTP Range request (206 appends; 200 starts
  over) from the .part file in <cache>/sources/.partial/: on the same URL, on the next mirror
  after a stall, or in the next run. ``file://`` URLs are copied.
- Verified files live at <cache>/sources/<sha256>/<file>. The expected sha256 is the recipe's
  pin or, for ``sha256 = "unknown"``, the entry in the lock file (kvmlab.lock, JSON, keyed
  "recipe/file"). The first fetch of an unknown source records it there with a loud warning
  (like go.sum), after checking that it is an archive kvmlab can unpack with files of the
  recipe's tree in it (kvmlab.source.tar.check_archive; a mirror serving an HTML page is skipped).
  A mismatch is a ChecksumError (expected, got, URL); the bytes are deleted and never enter the
  cache. ``relock`` replaces the lock entry with the hash of what is fetched now (never a pin).
- ``offline``: cache only. ``source=PATH``: a local tarball (verified and cached like a download) or
  a directory (used as is; its content hash is recorded instead); either is checked first
  (kvmlab.source.tar.check_archive / check_tree) and refused before anything is locked or cached.
The result is stamped in <work>/<recipe>/fetch.json.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from queue import Queue
from typing import Any
from urllib.parse import unquote, urlsplit

from kvmlab import __version__
from kvmlab.core import ui
from kvmlab.core.errors import ChecksumError, ConfigError, FetchError, UnpackError
from kvmlab.core.fsutil import CHUNK, atomic_write_json, read_json, sha256_file, tree_sha256
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe
from kvmlab.source.srpm import is_srpm
from kvmlab.source.tar import check_archive, check_tree

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
    check: str     # "pinned" | "locked" | "locked now" | "relocked" | "dir hash" | "local tree"
    previous: str | None = None  # relocked: the lock's sha256 before (None: there was none)

    def stamp(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        del d["status"], d["previous"]
        return d


class _UrlFailed(Exception):
    """One URL did not deliver; the message is the reason shown to the user. stalled: it gave
    no connection or no data within the timeout (tried again only after the other mirrors)."""

    def __init__(self, reason: str, stalled: bool = False):
        super().__init__(reason)
        self.stalled = stalled


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


def _record_lock(settings: Settings, recipe: Recipe, sha: str, origin: str,
                 relock: bool = False) -> None:
    data = _read_lock(settings.lock)
    entries = data.setdefault("sources", {})
    old = entries.get(lock_key(recipe))
    if relock and isinstance(old, dict) and old.get("sha256") == sha:
        return  # unchanged: the entry (and its date) stays as it is
    data.setdefault("comment", "source checksums recorded on first fetch by kvmlab (like go.sum); "
                               "commit this file, every later fetch must match")
    entries[lock_key(recipe)] = {
        "sha256": sha, "url": origin,
        "recorded": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    atomic_write_json(settings.lock, data)
    if not relock:
        ui.warn(f"[bold]{recipe.source.file} has no pinned sha256: recorded {sha} (from {origin}) "
                f"in {settings.lock}[/bold]. Check it against a trusted source; every later fetch "
                f"must match it.")


def _relock_hint(recipe: Recipe, settings: Settings, local: str | None) -> str:
    cmd = f"invoke fetch --recipe {recipe.name}" + (f" --source {local}" if local else "")
    return f"`{cmd} --relock` replaces the entry in {settings.lock}, showing the old and new hash"


# -- downloading ----------------------------------------------------------------------------------

def cache_path(settings: Settings, sha: str, file: str) -> Path:
    return settings.sources_cache / sha / file


class _Part:
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


def _session(opts: FetchOptions) -> Any:
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
            stalled = _is_stall(e)
            raise _UrlFailed(_reason(e, opts) + (f" (after {part.size} bytes)" if stalled and
                                                 part.size else ""), stalled) from None
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
                part.write(iter(lambda: read1(CHUNK, decode_content=False), b""), url)
                return
            except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
                reason = _reason(e, opts)
                if _is_stall(e):  # no Range resume on a stalled mirror: the next one resumes
                    raise _UrlFailed(f"{reason} after {part.size} bytes", stalled=True) from None
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
        part.write(iter(lambda: f.read(CHUNK), b""), url)


def _download(settings: Settings, recipe: Recipe, urls: list[str], expected: str | None,
              check: str, opts: FetchOptions, *, validate: bool = True,
              local: str | None = None) -> FetchResult:
    """Fill the .part from the first URL that delivers and store it (see _store).

    A stalled URL is put back at the end: tried once more after every other URL was tried.
    validate: before the bytes are locked (no expected hash), check that they are an archive
    of the recipe's tree (a URL serving anything else counts as failed; the next is tried).
    local: the --source path the single file:// URL stands for (for messages)."""
    file = recipe.source.file
    failures: list[str] = []
    session = None
    part_path = settings.sources_cache / ".partial" / f"{file}.part"
    queue = [(u, False) for u in urls]  # (url, this is its second try after a stall)
    try:
        part_path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{part_path}.lock", "w") as lock, \
                ui.progress(f"fetch {file}", enabled=opts.progress) as prog:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per .part (parallel kvmlab runs)
            part = _Part(part_path, prog)
            while queue:
                url, again = queue.pop(0)
                ui.info(f"[dim]fetching {url}{' (again, it stalled before)' if again else ''}"
                        "[/dim]")
                try:
                    if url.startswith("file://"):
                        _fetch_file_url(url, part)
                    else:
                        session = session or _session(opts)
                        _fetch_http(session, url, part, opts)
                    if validate and not expected:
                        _check_download(part, recipe, url)
                except _UrlFailed as e:
                    failures.append(f"{url}{' (again)' if again else ''}: {e}")
                    retry_later = e.stalled and not again
                    if retry_later:
                        queue.append((url, True))
                    ui.warn(f"{url}: {e}" + (
                        "" if not queue else
                        "; no other mirror left: trying it once more" if queue[0][0] == url else
                        "; trying the next mirror" + ("; this one again after the others"
                                                      if retry_later else "")))
                    continue
                return _store(settings, recipe, part, url, expected, check, local)
    except OSError as e:  # the local side: cache dir not writable, disk full, ...
        if e.filename and not Path(str(e.filename)).is_relative_to(settings.cache):
            raise  # not the cache (the lock file, ...): the task layer names its setting
        raise FetchError(f"cannot write {e.filename or part_path}: {e.strerror or e}",
                         hint="check free space and permissions of the cache (KVMLAB_CACHE)")
    finally:
        if session is not None:
            session.close()
    raise FetchError(f"could not fetch {file} from any of its {len(urls)} URL(s): " +
                     "; ".join(failures),
                     hint="check the network/proxy, add a mirror to the recipe, or use "
                          "--source PATH with a local copy of the tarball")


def _check_download(part: _Part, recipe: Recipe, url: str) -> None:
    """Before locking bytes nobody vouched for: they must be an archive of the recipe's tree."""
    try:
        check_archive(part.path, recipe, name=recipe.source.file)
    except UnpackError as e:
        part.reset()
        raise _UrlFailed(f"not used: {e.message}") from None


def _store(settings: Settings, recipe: Recipe, part: _Part, url: str, expected: str | None,
           check: str, local: str | None = None) -> FetchResult:
    got = part.h.hexdigest()
    if expected and got != expected:
        origins = part.origins
        part.path.unlink(missing_ok=True)
        mixed = f" (its bytes came from {', then '.join(origins)})" if len(origins) > 1 else ""
        raise ChecksumError(
            f"sha256 mismatch for {recipe.source.file} from {local or url}: expected {expected} "
            f"({check}), got {got}{mixed}; the fetched copy was deleted, nothing was cached",
            hint="a corrupt or truncated mirror, a different release under the same name, or "
                 "tampering. " + (
                     f"If the recipe's pin is wrong, fix source.sha256 in {recipe.path} "
                     "(--relock never overrides a pin)" if check == "pinned" else
                     "If you trust the new file (e.g. upstream re-rolled the release), " +
                     _relock_hint(recipe, settings, local)))
    dest = cache_path(settings, got, recipe.source.file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = part.size
    os.replace(part.path, dest)
    if not expected:
        _record_lock(settings, recipe, got, local or url, relock=check == "relocked")
        check = "relocked" if check == "relocked" else "locked now"
    return FetchResult(recipe.name, recipe.source.file, "tarball", dest, got, size, url,
                       "downloaded", check)


# -- entry point ----------------------------------------------------------------------------------

def stamp_path(settings: Settings, recipe: Recipe) -> Path:
    return settings.work(recipe.name) / "fetch.json"


def fetch_source(settings: Settings, recipe: Recipe, *, source: str | Path | None = None,
                 offline: bool = False, force: bool = False, relock: bool = False,
                 options: FetchOptions | None = None) -> FetchResult:
    """Make the recipe's source available locally, verified; stamp <work>/fetch.json.

    force: download again even when the cache has the file (the cache is always re-hashed).
    relock: fetch again (mirrors, or source) and replace the recipe's kvmlab.lock entry with the
    sha256 of what arrived (FetchResult.previous is the old one); refused for a pinned recipe.
    """
    opts = options or FetchOptions.from_env()
    result = _fetch(settings, recipe, source, offline, force, relock, opts)
    stamp = stamp_path(settings, recipe)
    try:
        current = read_json(stamp)
    except ValueError:
        current = None
    if current != result.stamp():
        atomic_write_json(stamp, result.stamp())
    return result


def check_source(source: str | Path, recipe: Recipe) -> None:
    """Refuse a bad --source up front (before a build or lab takes locks or writes state)."""
    _local_source(source, recipe)


def _local_source(source: str | Path, recipe: Recipe) -> tuple[Path, bool]:
    """The --source path, checked: (resolved path, is a directory). FetchError when it does not
    exist or cannot be read; UnpackError when it is empty or not an archive/tree of the recipe
    (kvmlab.source.tar.check_archive / check_tree)."""
    p = Path(source).expanduser().resolve()
    hint = (f"give the recipe's {recipe.source.file} (or another tar/.src.rpm archive of its "
            "sources) or an unpacked source directory")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FetchError(f"--source {source}: no such file or directory", hint=hint) from None
    except OSError as e:
        raise FetchError(f"--source {source}: cannot read it: {(e.strerror or str(e)).lower()}",
                         hint="check its permissions (and those of its parent directories)"
                         ) from None
    try:
        if stat.S_ISDIR(st.st_mode):
            check_tree(p, recipe, name=str(source))
            return p, True
        check_archive(p, recipe, name=str(source))
    except UnpackError as e:
        # an UnpackError stays one: the archive/tree is what is wrong, not the fetching
        raise UnpackError(f"--source {e.message}", hint=e.hint or hint) from None
    return p, False


def _fetch(settings: Settings, recipe: Recipe, source: str | Path | None, offline: bool,
           force: bool, relock: bool, opts: FetchOptions) -> FetchResult:
    file = recipe.source.file
    if relock and recipe.source.pinned:
        raise FetchError(
            f"--relock: recipe {recipe.name} pins source.sha256 = {recipe.source.sha256} in "
            f"{recipe.path}; --relock replaces kvmlab.lock entries only, it never overrides a pin",
            hint="if the pin is wrong, edit source.sha256 in the recipe; without --relock the "
                 "pin is checked as usual")
    if relock and offline and not source:
        raise FetchError("--relock fetches the source again, which --offline forbids",
                         hint="drop --offline, or give --source PATH with the copy to lock")
    if source:
        p, is_dir = _local_source(source, recipe)
        local_tree = is_dir or (recipe.source.format == "srpm" and not is_srpm(p))
        if local_tree and relock:
            raise FetchError(f"--relock: --source {source} is "
                             f"{'a directory' if is_dir else 'a plain tree, not a source RPM'}; "
                             "such sources are hashed on every use, never locked",
                             hint=f"give the {file} to lock with --relock, or drop --relock")
        if is_dir:
            try:
                sha = tree_sha256(p)
            except OSError as e:
                raise FetchError(f"--source {source}: cannot read {e.filename}: "
                                 f"{(e.strerror or str(e)).lower()}",
                                 hint="every file of a source directory must be readable") from None
            return FetchResult(recipe.name, file, "dir", p, sha, 0, str(p), "local", "dir hash")
        if local_tree:
            # a plain (already %prep'ed) tree tarball for an srpm recipe: hashed, never locked
            # as the source RPM's checksum
            return FetchResult(recipe.name, p.name, "tarball", p, sha256_file(p),
                               p.stat().st_size, str(p), "local", "local tree")
    if relock:
        previous, _ = expected_sha256(settings, recipe)
        urls = [p.as_uri()] if source else list(recipe.source.urls)
        r = _download(settings, recipe, urls, None, "relocked", opts, validate=not source,
                      local=str(p) if source else None)
        return replace(r, previous=previous, **({"origin": str(p), "status": "local"}
                                                if source else {}))
    expected, check = expected_sha256(settings, recipe)
    if source:  # always hashed: it must be the pinned/locked tarball
        r = _download(settings, recipe, [p.as_uri()], expected, check, opts, validate=False,
                      local=str(p))
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
