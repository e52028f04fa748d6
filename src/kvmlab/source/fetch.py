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
The result is stamped in <work>/<recipe>/fetch.json (a kvmlab.core.stamps.Stamp, see fetch_stamp);
kvmlab.lock is kept by kvmlab.source.lock, HTTP and file:// by kvmlab.source.mirrors.
"""
from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvmlab.core import ui
from kvmlab.core.errors import ChecksumError, FetchError, UnpackError
from kvmlab.core.fsutil import sha256_file, tree_sha256
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings
from kvmlab.core.stamps import Stamp
from kvmlab.model.recipe import Recipe
from kvmlab.source.lock import expected_sha256, record_lock, relock_hint
from kvmlab.source.mirrors import (
    FetchOptions,
    Part,
    UrlFailed,
    fetch_file_url,
    fetch_http,
    http_session,
)
from kvmlab.source.srpm import is_srpm
from kvmlab.source.tar import check_archive, check_tree

__all__ = ["FetchOptions", "FetchResult", "cache_path", "check_source", "expected_sha256",
           "fetch_source", "fetch_stamp", "read_fetch_stamp", "stamp_path"]


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

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def cache_path(settings: Settings, sha: str, file: str) -> Path:
    return settings.sources_cache / sha / file


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
            part = Part(part_path, prog)
            while queue:
                url, again = queue.pop(0)
                ui.info(f"[dim]fetching {url}{' (again, it stalled before)' if again else ''}"
                        "[/dim]")
                try:
                    if url.startswith("file://"):
                        fetch_file_url(url, part)
                    else:
                        session = session or http_session(opts)
                        fetch_http(session, url, part, opts)
                    if validate and not expected:
                        _check_download(part, recipe, url)
                except UrlFailed as e:
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


def _check_download(part: Part, recipe: Recipe, url: str) -> None:
    """Before locking bytes nobody vouched for: they must be an archive of the recipe's tree."""
    try:
        check_archive(part.path, recipe, name=recipe.source.file)
    except UnpackError as e:
        part.reset()
        raise UrlFailed(f"not used: {e.message}") from None


def _store(settings: Settings, recipe: Recipe, part: Part, url: str, expected: str | None,
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
                     relock_hint(recipe, settings, local)))
    dest = cache_path(settings, got, recipe.source.file)
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = part.size
    os.replace(part.path, dest)
    if not expected:
        record_lock(settings, recipe, got, local or url, relock=check == "relocked")
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
    stamp, record = fetch_stamp(settings, recipe), result.stamp()
    inputs = {"recipe": recipe.name, "file": result.file, "kind": result.kind,
              "sha256": result.sha256}
    if stamp.fresh(inputs) != record:
        stamp.write(inputs, record)
    return result


def fetch_stamp(settings: Settings, recipe: Recipe) -> Stamp:
    """fetch.json: inputs {recipe, file, kind, sha256}; record FetchResult.stamp()."""
    return Stamp(stamp_path(settings, recipe), "fetch")


def read_fetch_stamp(settings: Settings, recipe: Recipe) -> dict[str, Any] | None:
    """What the last fetch recorded (FetchResult.stamp()), or None (none, or an old format)."""
    data = fetch_stamp(settings, recipe).read()
    record = data.get("record") if data else None
    return record if isinstance(record, dict) else None


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
        p, local = _local_tree(source, recipe, relock)
        if local is not None:
            return local
    if relock:
        previous, _ = expected_sha256(settings, recipe)
        urls = [p.as_uri()] if source else list(recipe.source.urls)
        r = _download(settings, recipe, urls, None, "relocked", opts, validate=not source,
                      local=str(p) if source else None)
        r = replace(r, previous=previous)
        return replace(r, origin=str(p), status="local") if source else r
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


def _local_tree(source: str | Path, recipe: Recipe, relock: bool
                ) -> tuple[Path, FetchResult | None]:
    """--source given: (its resolved path, the result for a directory or a plain tree, hashed on
    every use and never locked; None when it is the recipe's own archive, checked against its
    pin/lock by the caller)."""
    file = recipe.source.file
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
        return p, FetchResult(recipe.name, file, "dir", p, sha, 0, str(p), "local", "dir hash")
    if local_tree:
        # a plain (already %prep'ed) tree tarball for an srpm recipe: hashed, never locked
        # as the source RPM's checksum
        return p, FetchResult(recipe.name, p.name, "tarball", p, sha256_file(p),
                              p.stat().st_size, str(p), "local", "local tree")
    return p, None
