"""Recipes: what to build, as data (recipes/NAME.toml), validated on load.

A recipe names its sources (ordered mirror URLs, file name, sha256 or "unknown" = lock on first
use), the patch series per builder, the configure/make commands, the artifacts to collect and where
install puts them. Every error names the file, the key and what was expected.
"""
from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmlab.core.errors import RecipeError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UNKNOWN_SHA = "unknown"
KINDS = ("qemu", "kmod")
BUILDERS = ("debian12", "centos6", "native")

# section -> key -> (python type(s), required, default). A key of "" means "the section itself".
_STR = str
_LIST = list
_DICT = dict
_BOOL = bool
_INT = int
SCHEMA: dict[str, dict[str, tuple[Any, bool, Any]]] = {
    "": {
        "schema": (_INT, False, 1),
        "name": (_STR, True, None),
        "kind": (_STR, False, "qemu"),
        "version": (_STR, True, None),
        "summary": (_STR, False, ""),
    },
    "source": {
        "file": (_STR, True, None),
        "urls": (_LIST, True, None),
        "sha256": (_STR, True, None),
        "sha256_note": (_STR, False, ""),
        "strip_components": (_INT, False, 1),
        "format": (_STR, False, "tar"),
    },
    "build": {
        "configure": (_LIST, False, []),
        "make": (_LIST, False, ["make", "-j{jobs}"]),
        "env": (_DICT, False, {}),
        "install": (_LIST, False, ["make", "install"]),
    },
    "artifacts": {
        "binaries": (_LIST, False, []),
        "firmware": (_LIST, False, []),
        "option_roms": (_LIST, False, []),
        "data_dirs": (_LIST, False, []),   # whole directories, e.g. pc-bios/keymaps
        "modules": (_LIST, False, []),
    },
    "install": {
        "prefix": (_STR, False, "/usr/local"),
        "bindir": (_STR, False, "bin"),
        "datadir": (_STR, False, "share/qemu"),
        "firmware_compat_dirs": (_LIST, False, []),
        "binary_names": (_DICT, False, {}),
    },
    "options": {},  # free-form booleans/strings, e.g. debug-bios-path = false
    "kmod": {},     # free-form, validated by the kmod step
    "builders": {},  # validated separately (one table per builder)
}
BUILDER_SCHEMA: dict[str, tuple[Any, bool, Any]] = {
    "series": (_STR, False, ""),
    "configure_add": (_LIST, False, []),
    "configure_drop": (_LIST, False, []),
    "cflags": (_STR, False, ""),
    "env": (_DICT, False, {}),
    "image": (_STR, False, ""),
    "notes": (_STR, False, ""),
}


@dataclass(frozen=True)
class Source:
    file: str
    urls: tuple[str, ...]
    sha256: str  # 64 hex chars, or "unknown" (locked on first fetch)
    sha256_note: str = ""
    strip_components: int = 1
    format: str = "tar"

    @property
    def pinned(self) -> bool:
        return self.sha256 != UNKNOWN_SHA


@dataclass(frozen=True)
class BuilderConfig:
    name: str
    series: str = ""
    configure_add: tuple[str, ...] = ()
    configure_drop: tuple[str, ...] = ()
    cflags: str = ""
    env: dict[str, str] = field(default_factory=dict)
    image: str = ""
    notes: str = ""


@dataclass(frozen=True)
class Recipe:
    name: str
    version: str
    kind: str
    summary: str
    source: Source
    build: dict[str, Any]
    artifacts: dict[str, tuple[str, ...]]
    install: dict[str, Any]
    options: dict[str, Any]
    builders: dict[str, BuilderConfig]
    path: Path
    raw: dict[str, Any]
    sha256: str  # hash of the recipe file's bytes

    def builder(self, name: str) -> BuilderConfig:
        if name in self.builders:
            return self.builders[name]
        if name == "native" and "debian12" in self.builders:
            # the host is a current Debian-like toolchain: reuse debian12's adjustments
            b = self.builders["debian12"]
            return BuilderConfig(name="native", series=b.series, configure_add=b.configure_add,
                                 configure_drop=b.configure_drop, cflags=b.cflags, env=b.env,
                                 notes=b.notes)
        raise RecipeError(
            f"recipe {self.name!r} has no builder {name!r}",
            hint="available: " + ", ".join(sorted(self.builders)) if self.builders else
            f"add a [builders.{name}] table to {self.path}")

    def configure_args(self, builder: str) -> list[str]:
        """The configure command line for a builder: base args, minus drops, plus adds."""
        b = self.builder(builder)
        drops = set(b.configure_drop)
        args = [a for a in self.build.get("configure", []) if a not in drops]
        return args + [a for a in b.configure_add if a not in args]

    def series_path(self, patches_dir: Path, builder: str) -> Path | None:
        b = self.builder(builder)
        if not b.series:
            return None
        return patches_dir / self.name / b.series

    def option(self, name: str, default: Any = None) -> Any:
        return self.options.get(name, default)


def _type_name(t: Any) -> str:
    return {str: "a string", list: "a list", dict: "a table", bool: "true/false",
            int: "an integer"}.get(t, str(t))


def _check_table(path: Path, where: str, table: Any, schema: dict[str, tuple[Any, bool, Any]],
                 strict: bool = True) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise RecipeError(f"{path}: [{where}] must be a table")
    out: dict[str, Any] = {}
    for key, (typ, required, default) in schema.items():
        label = f"{where}.{key}" if where else key
        if key not in table:
            if required:
                raise RecipeError(f"{path}: missing key '{label}'",
                                  hint=f"expected {_type_name(typ)}")
            out[key] = default
            continue
        val = table[key]
        if typ is int and isinstance(val, bool) or not isinstance(val, typ):
            raise RecipeError(f"{path}: key '{label}' must be {_type_name(typ)}, got {val!r}")
        if typ is list and not all(isinstance(x, str) for x in val):
            raise RecipeError(f"{path}: key '{label}' must be a list of strings")
        out[key] = val
    if strict:
        for key in table:
            if key not in schema:
                label = f"{where}.{key}" if where else key
                raise RecipeError(f"{path}: unknown key '{label}'",
                                  hint="known keys: " + ", ".join(sorted(schema)))
    return out


def _read_toml(path: Path) -> tuple[bytes, dict[str, Any]]:
    try:
        data_bytes = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        return data_bytes, tomllib.loads(data_bytes.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        # message already carries "(at line L, column C)"
        raise RecipeError(f"{path}: TOML syntax error: {e}") from None


def _parse_source(path: Path, data: dict[str, Any]) -> Source:
    if "source" not in data:
        raise RecipeError(f"{path}: missing table [source]", hint="needs file, urls, sha256")
    src = _check_table(path, "source", data["source"], SCHEMA["source"])
    sha = src["sha256"].lower()
    if sha != UNKNOWN_SHA and not SHA256_RE.match(sha):
        raise RecipeError(f"{path}: key 'source.sha256' must be 64 hex digits or \"unknown\", "
                          f"got {src['sha256']!r}")
    if "/" in src["file"] or src["file"] in ("", ".", ".."):
        raise RecipeError(f"{path}: key 'source.file' must be a plain file name, "
                          f"got {src['file']!r}")
    for u in src["urls"]:
        if not re.match(r"^(https?|file)://", u):
            raise RecipeError(f"{path}: key 'source.urls' has {u!r}",
                              hint="URLs must start with http://, https:// or file://")
    return Source(file=src["file"], urls=tuple(src["urls"]), sha256=sha,
                  sha256_note=src["sha256_note"], strip_components=src["strip_components"],
                  format=src["format"])


def _parse_builders(path: Path, data: dict[str, Any]) -> dict[str, BuilderConfig]:
    builders: dict[str, BuilderConfig] = {}
    braw = data.get("builders", {})
    if not isinstance(braw, dict):
        raise RecipeError(f"{path}: [builders] must be a table of tables")
    for bname, btable in braw.items():
        if bname not in BUILDERS:
            raise RecipeError(f"{path}: unknown builder [builders.{bname}]",
                              hint="known builders: " + ", ".join(BUILDERS))
        bv = _check_table(path, f"builders.{bname}", btable, BUILDER_SCHEMA)
        builders[bname] = BuilderConfig(
            name=bname, series=bv["series"], configure_add=tuple(bv["configure_add"]),
            configure_drop=tuple(bv["configure_drop"]), cflags=bv["cflags"], env=dict(bv["env"]),
            image=bv["image"], notes=bv["notes"])
    return builders


def parse_recipe(path: Path) -> Recipe:
    """Load and validate one recipe file."""
    data_bytes, data = _read_toml(path)
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for k, v in data.items():
        if isinstance(v, dict) and k not in SCHEMA:
            raise RecipeError(f"{path}: unknown table [{k}]",
                              hint="known tables: " + ", ".join(sorted(s for s in SCHEMA if s)))
    topv = _check_table(path, "", top, SCHEMA[""])
    if topv["kind"] not in KINDS:
        raise RecipeError(f"{path}: key 'kind' must be one of {', '.join(KINDS)}, "
                          f"got {topv['kind']!r}")
    source = _parse_source(path, data)
    build = _check_table(path, "build", data.get("build", {}), SCHEMA["build"])
    arts = _check_table(path, "artifacts", data.get("artifacts", {}), SCHEMA["artifacts"])
    inst = _check_table(path, "install", data.get("install", {}), SCHEMA["install"])
    options = data.get("options", {})
    if topv["kind"] == "qemu" and not build["configure"]:
        raise RecipeError(f"{path}: missing key 'build.configure'",
                          hint="a list such as [\"./configure\", \"--target-list=x86_64-softmmu\"]")
    if topv["kind"] == "qemu" and not arts["binaries"]:
        raise RecipeError(f"{path}: missing key 'artifacts.binaries'",
                          hint="a list of paths relative to the build tree")
    return Recipe(
        name=topv["name"], version=topv["version"], kind=topv["kind"], summary=topv["summary"],
        source=source, build=build,
        artifacts={k: tuple(v) for k, v in arts.items()}, install=inst, options=dict(options),
        builders=_parse_builders(path, data), path=path, raw=data,
        sha256=hashlib.sha256(data_bytes).hexdigest())


def recipe_path(recipes_dir: Path, name: str) -> Path:
    p = Path(name)
    if p.suffix == ".toml" and ("/" in name or p.exists()):
        return p
    return recipes_dir / f"{name}.toml"


def load_recipe(recipes_dir: Path, name: str) -> Recipe:
    """Load a recipe by name (recipes/NAME.toml) or by path to a .toml file."""
    path = recipe_path(recipes_dir, name)
    if not path.exists():
        known = [p.stem for p in sorted(recipes_dir.glob("*.toml"))]
        raise RecipeError(f"unknown recipe {name!r} (no {path})",
                          hint="known recipes: " + (", ".join(known) or "none") +
                          "; `invoke recipes` lists them")
    r = parse_recipe(path)
    if r.name != path.stem and path.parent == recipes_dir:
        raise RecipeError(f"{path}: key 'name' is {r.name!r} but the file is {path.name}",
                          hint=f"rename the file to {r.name}.toml or fix 'name'")
    return r


def list_recipes(recipes_dir: Path) -> list[Recipe | RecipeError]:
    """Every recipe in the directory; invalid ones come back as their error."""
    out: list[Recipe | RecipeError] = []
    for p in sorted(recipes_dir.glob("*.toml")):
        try:
            out.append(load_recipe(recipes_dir, p.stem))
        except RecipeError as e:
            out.append(e)
    return out
