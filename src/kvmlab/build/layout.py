"""Where a build lives: build tree, log, lock and out/ of a recipe and builder, and the result type.

Layout of the output (binding for install and the other steps)::

    out/<recipe>/<builder>/bin/<basename of each artifacts.binaries>
    out/<recipe>/<builder>/pc-bios/<basename of each artifacts.firmware / option_roms>
    out/<recipe>/<builder>/manifest.json          (kmod recipes: the .ko files at the top)

The build tree is ``work/<recipe>/build-<builder>`` (manifest "build_dir"), its log
``work/<recipe>/build-<builder>.log``; one build per recipe runs at a time (``build_lock``).
"""
from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core.errors import BuildError
from kvmlab.core.records import to_jsonable
from kvmlab.core.settings import Settings

MANIFEST = "manifest.json"
DEFAULT_TIMEOUT = float(os.environ.get("KVMLAB_BUILD_TIMEOUT", "7200"))


@dataclass(frozen=True)
class BuildResult:
    out_dir: Path
    manifest: dict
    noop: bool

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)


def build_dir(settings: Settings, recipe: str, builder: str) -> Path:
    return settings.work(recipe) / f"build-{builder}"


def log_path(settings: Settings, recipe: str, builder: str) -> Path:
    return settings.work(recipe) / f"build-{builder}.log"


@contextmanager
def build_lock(settings: Settings, recipe: str, builder: str) -> Iterator[None]:
    """One build per recipe at a time: builds share the prepared source tree (work/<recipe>/src),
    and per builder the build tree and out/."""
    path = settings.work(recipe) / ".build.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise BuildError(f"another build of {recipe} is running (pid {holder})",
                             hint="wait for it to finish, or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
