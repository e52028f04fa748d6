"""Settings shared by every step: where recipes, caches, work trees and outputs live.

One table (``SETTINGS``) declares each setting once: its name, default and help. Values are
resolved in this order: explicit argument > ``KVMLAB_<NAME>`` environment variable > invoke
configuration (``kvmlab:`` section of invoke.yaml / kvmlab.yaml) > default.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kvmlab.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # src/kvmlab


def _find_project_dir() -> Path:
    """The directory holding recipes/, patches/ and docker/.

    KVMLAB_HOME wins; else the current directory or one of its parents when it has recipes/;
    else the source checkout this package was installed from (src layout, editable install).
    """
    env = os.environ.get("KVMLAB_HOME")
    if env:
        return Path(env).resolve()
    cwd = Path.cwd().resolve()
    for d in (cwd, *cwd.parents):
        if (d / "recipes").is_dir() and (d / "patches").is_dir():
            return d
    checkout = PACKAGE_DIR.parent.parent
    if (checkout / "recipes").is_dir():
        return checkout
    return cwd


@dataclass(frozen=True)
class Setting:
    name: str
    help: str
    default: Any  # callable(project_dir, values resolved so far) -> value, or a plain value


SETTINGS: tuple[Setting, ...] = (
    Setting("home", "project directory with recipes/, patches/, docker/", lambda p, v: p),
    Setting("state_dir", "where work/, out/ and lab.lock.json are written", lambda p, v: p),
    Setting("cache", "content-addressed download cache",
            lambda p, v: Path(os.environ.get("XDG_CACHE_HOME",
                                             Path.home() / ".cache")) / "kvmlab"),
    Setting("lock", "source checksum lock file (like go.sum)", lambda p, v: p / "kvmlab.lock"),
    Setting("recipes_dir", "directory of recipe files", lambda p, v: p / "recipes"),
    Setting("patches_dir", "directory of patch series (patches/<recipe>/series)",
            lambda p, v: p / "patches"),
    Setting("recipe", "default recipe name", "qemu-kvm-0.12.1.2"),
    Setting("builder", "default builder (debian12, centos6, native)", "debian12"),
    Setting("known_hosts", "ssh host keys kvmlab trusts and records (--accept-new-host-keys)",
            lambda p, v: v["state_dir"] / "known_hosts"),
    Setting("user_known_hosts", "ssh's known_hosts kvmlab also trusts (read only)",
            lambda p, v: Path.home() / ".ssh" / "known_hosts"),
)


def env_name(setting: str) -> str:
    """The environment variable of a setting: state_dir -> KVMLAB_STATE_DIR."""
    return "KVMLAB_" + setting.upper()


@dataclass(frozen=True)
class Settings:
    home: Path
    state_dir: Path
    cache: Path
    lock: Path
    recipes_dir: Path
    patches_dir: Path
    recipe: str
    builder: str
    known_hosts: Path
    user_known_hosts: Path

    def env(self) -> dict[str, str]:
        """These settings as the KVMLAB_* environment a child kvmlab (the checks, a remote
        host) reads back: one variable per row of SETTINGS."""
        return {env_name(s.name): str(getattr(self, s.name)) for s in SETTINGS}

    # Derived locations -------------------------------------------------------------------
    @property
    def docker_dir(self) -> Path:
        return self.home / "docker"

    @property
    def checks_dir(self) -> Path:
        """The testinfra checks shipped with the package (kvmlab/checks/test_<step>.py)."""
        return PACKAGE_DIR / "checks"

    @property
    def work_dir(self) -> Path:
        return self.state_dir / "work"

    @property
    def out_dir(self) -> Path:
        return self.state_dir / "out"

    @property
    def sources_cache(self) -> Path:
        return self.cache / "sources"

    def work(self, recipe: str) -> Path:
        return self.work_dir / recipe

    def out(self, recipe: str, builder: str) -> Path:
        return self.out_dir / recipe / builder


_PATH_SETTINGS = {"home", "state_dir", "cache", "lock", "recipes_dir", "patches_dir",
                  "known_hosts", "user_known_hosts"}


def load_settings(overrides: Mapping[str, Any] | None = None,
                  invoke_config: Mapping[str, Any] | None = None) -> Settings:
    """Resolve every setting (see module docstring for the order)."""
    return resolve_settings(overrides, invoke_config)[0]


# where a setting's value came from, as `status` shows it
SOURCES = ("flag", "env", "config", "default")


def resolve_settings(overrides: Mapping[str, Any] | None = None,
                     invoke_config: Mapping[str, Any] | None = None
                     ) -> tuple[Settings, dict[str, str]]:
    """The settings and, per setting, where its value came from: ``flag``, ``env``
    (KVMLAB_<NAME>), ``config`` (the ``kvmlab:`` section) or ``default``."""
    overrides = {k: v for k, v in (overrides or {}).items() if v not in (None, "")}
    invoke_config = invoke_config or {}
    home_raw = overrides.get("home") or os.environ.get("KVMLAB_HOME") or invoke_config.get("home")
    project = Path(home_raw).expanduser().resolve() if home_raw else _find_project_dir()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        env = os.environ.get(env_name(s.name))
        if s.name in overrides:
            v, sources[s.name] = overrides[s.name], "flag"
        elif env:
            v, sources[s.name] = env, "env"
        elif invoke_config.get(s.name) not in (None, ""):
            v, sources[s.name] = invoke_config[s.name], "config"
        else:
            v = s.default(project, values) if callable(s.default) else s.default
            sources[s.name] = "default"
        if s.name in _PATH_SETTINGS:
            try:
                v = Path(v).expanduser().resolve()
            except (TypeError, ValueError) as e:
                raise ConfigError(f"setting {s.name!r}: not a path: {v!r}") from e
        values[s.name] = v
    return Settings(**{f.name: values[f.name] for f in fields(Settings)}), sources


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "yes", "true", "on"}
