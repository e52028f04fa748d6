"""The records steps hand each other: build manifest, install manifest, lab lock — typed, versioned.

Each record is a dataclass with a ``SCHEMA`` number, ``from_dict`` (reads every file kvmlab ever
wrote: missing keys get their defaults, keys it does not know are kept in ``extra`` and written
back unchanged) and ``to_dict`` (the JSON layout on disk, stable). ``load(path)`` reads a file and
turns a missing/corrupt one into one clear error.

- ``BuildManifest``: out/<recipe>/<builder>/manifest.json (qemu and kmod builds; kmod-only keys
  such as ``headers`` or ``kernel_release`` live in ``extra``).
- ``InstallManifest``: <state>/installs/<root>-<hash>.json (files written, their backups, the
  installs and the firmware placement).
- ``LabLock``: lab.lock.json (what a lab run produced, for ``lab --check``).
- ``InstallTarget``: where an install goes (destdir + prefix), normalised once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kvmlab.core.errors import KvmlabError

T = TypeVar("T", bound="Record")


class ManifestError(KvmlabError):
    """A manifest or lock file is missing, unreadable or not what kvmlab writes."""


@dataclass
class Record:
    """Shared reading/writing: known fields typed, the rest kept verbatim in ``extra``."""
    SCHEMA: ClassVar[int] = 1
    KIND: ClassVar[str] = "record"
    OPTIONAL: ClassVar[tuple[str, ...]] = ()   # keys not written while None (older files lack them)
    SORTED: ClassVar[bool] = False             # keys written in sorted order
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ManifestError(f"a {cls.KIND} must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        rec = cls(**values, extra={k: v for k, v in data.items() if k not in known})
        rec._check()
        return rec

    def _check(self) -> None:
        """Validate types a reader relies on (overridden where needed)."""

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"
               and not (f.name in self.OPTIONAL and getattr(self, f.name) is None)}
        out.update(self.extra)
        return dict(sorted(out.items())) if self.SORTED else out

    @classmethod
    def load(cls: type[T], path: Path | str) -> T:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ManifestError(f"no {cls.KIND} at {p}") from None
        except (OSError, ValueError) as e:
            raise ManifestError(f"cannot read the {cls.KIND} {p}: {e}",
                                hint="it was damaged; rerun the step that writes it") from None
        return cls.from_dict(data)

    def get(self, key: str, default: Any = None) -> Any:
        """dict-style read of a field or an extra key (for code and checks that read dicts)."""
        if key in {f.name for f in fields(self)} - {"extra"}:
            v = getattr(self, key)
            return default if v is None else v
        return self.extra.get(key, default)


@dataclass
class Artifact:
    path: str
    kind: str
    sha256: str
    size: int
    source: str = ""
    mode: str = "0644"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        known = {"path", "kind", "sha256", "size", "source", "mode"}
        return cls(**{k: d[k] for k in known if k in d},
                   extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kind": self.kind, "source": self.source,
                "sha256": self.sha256, "size": self.size, "mode": self.mode, **self.extra}


@dataclass
class RuntimeDep:
    soname: str
    needed_by: list[str] = field(default_factory=list)
    builder_path: str = ""
    builder_package: str = ""
    runtime_package: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuntimeDep:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class BuildManifest(Record):
    KIND: ClassVar[str] = "build manifest"
    recipe: str = ""
    builder: str = ""
    kind: str | None = None         # "kmod"; qemu builds never wrote the key
    recipe_sha256: str = ""
    image: str | None = None
    image_id: str | None = None
    source_sha256: str = ""
    patches: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    compiler: str = ""
    build_dir: str = ""
    log: str = ""
    inputs_sha256: str = ""
    built_at: str = ""
    artifacts: list[Artifact] = field(default_factory=list)
    # None: a manifest written before kvmlab recorded runtime dependencies (unknown)
    runtime_deps: list[RuntimeDep] | None = None

    def _check(self) -> None:
        if not self.recipe or not isinstance(self.artifacts, list):
            raise ManifestError("the build manifest names no recipe or has no artifact list",
                                hint="rebuild: invoke build --force")
        self.artifacts = [a if isinstance(a, Artifact) else Artifact.from_dict(a)
                          for a in self.artifacts]
        if self.runtime_deps is not None:
            self.runtime_deps = [d if isinstance(d, RuntimeDep) else RuntimeDep.from_dict(d)
                                 for d in self.runtime_deps]

    # older builds wrote no runtime_deps; qemu builds no kind
    OPTIONAL: ClassVar[tuple[str, ...]] = ("runtime_deps", "kind")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["artifacts"] = [a.to_dict() for a in self.artifacts]
        if self.runtime_deps is not None:
            out["runtime_deps"] = [d.to_dict() for d in self.runtime_deps]
        return out

    @property
    def is_kmod(self) -> bool:
        return self.kind == "kmod"

    def artifact(self, path: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.path == path), None)

    @property
    def datadir(self) -> str | None:
        """The firmware directory compiled into the binary (CONFIG_QEMU_SHAREDIR)."""
        v = self.config.get("datadir")
        return v if isinstance(v, str) and v else None


@dataclass
class InstallManifest(Record):
    SCHEMA: ClassVar[int] = 1
    KIND: ClassVar[str] = "install manifest"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("bios",)
    SORTED: ClassVar[bool] = True
    schema: int = 1
    root: str = ""
    prefix: str = ""
    destdir: str = ""
    files: list[dict[str, Any]] = field(default_factory=list)
    dirs_created: list[str] = field(default_factory=list)
    installs: list[dict[str, Any]] = field(default_factory=list)
    bios: dict[str, Any] | None = None
    updated: str = ""

    def _check(self) -> None:
        if not isinstance(self.files, list) or not isinstance(self.installs, list):
            raise ManifestError("the install manifest has no file list",
                                hint="it was damaged; `invoke uninstall --force` or reinstall")
        if self.schema > self.SCHEMA:
            raise ManifestError(f"install manifest schema {self.schema} is newer than this "
                                f"kvmlab ({self.SCHEMA})", hint="use the kvmlab that wrote it")

    def entry(self, path: str | Path) -> dict[str, Any] | None:
        p = str(path)
        return next((f for f in self.files if f.get("path") == p), None)


@dataclass
class LabLock(Record):
    SCHEMA: ClassVar[int] = 1
    KIND: ClassVar[str] = "lab lock"
    OPTIONAL: ClassVar[tuple[str, ...]] = ("image", "boot", "nested")
    SORTED: ClassVar[bool] = True
    schema: int = 1
    host: str = ""
    recipe: dict[str, Any] = field(default_factory=dict)
    builder: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    image: dict[str, Any] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    installed: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, str | None] = field(default_factory=dict)
    firmware_dirs: list[str] = field(default_factory=list)
    host_facts: dict[str, Any] = field(default_factory=dict)
    boot: dict[str, Any] | None = None
    nested: dict[str, Any] | None = None      # lab --nested: kvmlab.nested.record.NestedRecord

    def _check(self) -> None:
        if not isinstance(self.installed, dict) or not isinstance(self.recipe, dict):
            raise ManifestError("the lab lock has no recipe or installed-file table",
                                hint="rerun `invoke lab` to write a new one")



@dataclass(frozen=True)
class InstallTarget:
    """Where an install goes: ``destdir`` (staging root, "" for none) + absolute ``prefix``."""
    prefix: str
    destdir: str = ""

    @classmethod
    def of(cls, prefix: str | Path, destdir: str | Path | None = None) -> InstallTarget:
        p = os.path.normpath(str(prefix))
        if not os.path.isabs(p):
            raise ManifestError(f"install prefix {prefix!r} is not absolute",
                                hint="e.g. --prefix /usr/local")
        d = os.path.normpath(os.path.abspath(str(destdir))) if destdir else ""
        return cls(p, "" if d == "/" else d)

    @property
    def root(self) -> Path:
        """The directory files really go to: DESTDIR + PREFIX."""
        return Path(self.destdir + self.prefix) if self.destdir else Path(self.prefix)

    def path(self, rel_or_abs: str | Path) -> Path:
        """A path under the prefix (relative) or an absolute runtime path, with DESTDIR."""
        p = str(rel_or_abs)
        runtime = p if os.path.isabs(p) else os.path.join(self.prefix, p)
        return Path(self.destdir + runtime) if self.destdir else Path(runtime)
