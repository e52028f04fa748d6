"""A kmod recipe's [kmod] table, the facts of its target (headers + compiler), and the compat plan.

``kmod_spec`` validates the table into a ``KmodSpec``; ``facts_script`` gathers KEY=VALUE facts
about the target headers and compiler in the builder (``parse_facts`` reads them); ``compat_plan``
decides from the facts which COMPAT items the target needs (see compat/kmod/kvmlab-compat.h).
"""
from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core.errors import BuildError, RecipeError
from kvmlab.model.recipe import Recipe

COMPAT_HEADER = "kvmlab-compat.h"


_SPEC_KEYS: dict[str, tuple[type, bool]] = {
    "source": (str, True), "source_package": (str, False), "package_version": (str, False),
    "headers_package": (str, True), "headers": (str, True), "kernel_release": (str, True),
    "dirs": (list, True), "module_dir": (str, True), "compat": (str, False),
    "kcflags": (list, False), "srpm_tarball": (str, False), "notes": (str, False),
}
SOURCE_KINDS = ("image", "fetch")


@dataclass(frozen=True)
class KmodSpec:
    source: str                # "image": source.urls[0] is file:///<path inside the image>
    source_path: str
    source_sha256: str         # pinned, or "unknown"
    source_package: str
    package_version: str
    headers_package: str
    headers: str               # headers directory inside the image
    kernel_release: str
    dirs: tuple[str, ...]
    module_dir: str
    compat: str
    kcflags: tuple[str, ...]
    srpm_tarball: str = ""


def kmod_spec(recipe: Recipe) -> KmodSpec:
    """The validated [kmod] table of a kind = "kmod" recipe (RecipeError naming the key)."""
    where = recipe.path
    if recipe.kind != "kmod":
        raise RecipeError(f"{where}: recipe {recipe.name!r} is of kind {recipe.kind!r}, not kmod")
    table = recipe.raw.get("kmod")
    if not isinstance(table, dict):
        raise RecipeError(f"{where}: a kind = \"kmod\" recipe needs a [kmod] table",
                          hint="see recipes/kvm-kmod-6.1.toml")
    for k, v in table.items():
        if k not in _SPEC_KEYS:
            raise RecipeError(f"{where}: unknown key 'kmod.{k}'",
                              hint="known keys: " + ", ".join(sorted(_SPEC_KEYS)))
        typ = _SPEC_KEYS[k][0]
        if not isinstance(v, typ) or isinstance(v, list) and not all(isinstance(x, str) for x in v):
            raise RecipeError(f"{where}: key 'kmod.{k}' must be "
                              f"{'a list of strings' if typ is list else 'a string'}, got {v!r}")
    for k, (_, required) in _SPEC_KEYS.items():
        if required and not table.get(k):
            raise RecipeError(f"{where}: missing key 'kmod.{k}'")
    if table["source"] not in SOURCE_KINDS:
        raise RecipeError(f"{where}: key 'kmod.source' must be one of {', '.join(SOURCE_KINDS)}, "
                          f"got {table['source']!r}")
    for k in ("dirs", "module_dir"):
        vals = table[k] if isinstance(table[k], list) else [table[k]]
        for v in vals:
            if v.startswith("/") or ".." in Path(v).parts or not re.fullmatch(r"[\w./+-]+", v):
                raise RecipeError(f"{where}: key 'kmod.{k}' has {v!r}",
                                  hint="relative paths inside the kernel source, e.g. arch/x86/kvm")
    if not any(table["module_dir"] == d or table["module_dir"].startswith(d + "/")
               for d in table["dirs"]):
        raise RecipeError(f"{where}: kmod.module_dir {table['module_dir']!r} is not under "
                          f"kmod.dirs {table['dirs']}")
    if not recipe.artifacts.get("modules"):
        raise RecipeError(f"{where}: missing key 'artifacts.modules'",
                          hint='e.g. ["arch/x86/kvm/kvm.ko", "arch/x86/kvm/kvm-intel.ko"]')
    url = recipe.source.urls[0]
    source_path = url[len("file://"):] if url.startswith("file://") else url
    if table["source"] == "image" and not url.startswith("file:///"):
        raise RecipeError(f"{where}: kmod.source = \"image\" needs source.urls = "
                          "[\"file:///<path of the tarball inside the builder image>\"]")
    for k in ("headers", "kernel_release"):
        if not re.fullmatch(r"[\w./+-]+", table[k]):
            raise RecipeError(f"{where}: key 'kmod.{k}' has unexpected characters: {table[k]!r}")
    return KmodSpec(
        source=table["source"], source_path=source_path, source_sha256=recipe.source.sha256,
        source_package=table.get("source_package", ""),
        package_version=table.get("package_version", ""),
        headers_package=table["headers_package"], headers=table["headers"],
        kernel_release=table["kernel_release"], dirs=tuple(table["dirs"]),
        module_dir=table["module_dir"], compat=table.get("compat", ""),
        kcflags=tuple(table.get("kcflags", [])), srpm_tarball=table.get("srpm_tarball", ""))


# --------------------------------------------------------------------------------------------
# facts about the target headers + compiler (gathered in the builder), and the compat plan

def facts_script(spec: KmodSpec, out_file: str) -> str:
    """POSIX sh (debian12 and centos6 images) writing KEY=VALUE facts to out_file."""
    q = shlex.quote
    return "\n".join([
        f"H={q(spec.headers)}; F={q(out_file)}",
        ': > "$F"',
        'fact() { printf "%s=%s\\n" "$1" "$2" >> "$F"; }',
        # Debian splits the headers: <abi>-amd64/Makefile includes <abi>-common/Makefile
        'DIRS="$H $(sed -n \'s@^include \\(/[^ ]*\\)/Makefile$@\\1@p\' "$H/Makefile" 2>/dev/null)"',
        'fact HEADER_DIRS "$DIRS"',
        'rel=$(cat "$H/include/generated/utsrelease.h" "$H/include/linux/utsrelease.h" '
        '2>/dev/null | sed -n \'s/^#define UTS_RELEASE "\\(.*\\)"/\\1/p\' | head -n 1)',
        'fact UTS_RELEASE "$rel"',
        'v=no; for d in $DIRS; do grep -rqsE "^[[:space:]]*#[[:space:]]*define[[:space:]]+'
        'IS_ENABLED" "$d/include/linux" && v=yes; done; fact HAS_IS_ENABLED $v',
        'v=no; for d in $DIRS; do grep -qs -- "-fno-PIE" "$d/Makefile" "$d/arch/x86/Makefile" '
        '&& v=yes; done; fact KERNEL_NO_PIE $v',
        'v=no; for d in $DIRS; do grep -qs -- "-std=gnu" "$d/Makefile" && v=yes; done; '
        'fact KERNEL_STD $v',
        'v=no; g=""; for d in $DIRS; do grep -qs "gcc_header(__GNUC__)" '
        '"$d/include/linux/compiler-gcc.h" && v=yes; '
        'for f in "$d"/include/linux/compiler-gcc[0-9]*.h; do [ -f "$f" ] && '
        'g="$g ${f##*/}"; done; done; fact COMPILER_GCC_SCHEME $v; fact COMPILER_GCC_HEADERS "$g"',
        'fact GCC_VERSION "$(gcc -dumpfullversion 2>/dev/null || gcc -dumpversion)"',
        'fact GCC "$(gcc --version | head -n 1)"',
        'if echo | gcc -dM -E - | grep -q "__PIE__"; then fact GCC_DEFAULT_PIE yes; '
        'else fact GCC_DEFAULT_PIE no; fi',
        'pv() { dpkg-query -W -f=\'${Version}\' "$1" 2>/dev/null || '
        'rpm -q --qf \'%{VERSION}-%{RELEASE}\' "$1" 2>/dev/null || true; }',
        f'fact HEADERS_PACKAGE_VERSION "$(pv {q(spec.headers_package)})"',
        f'fact SOURCE_PACKAGE_VERSION "$(pv {q(spec.source_package)})"' if spec.source_package
        else "true",
    ])


def parse_facts(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_]+", k):
            out[k] = v.strip()
    return out


@dataclass(frozen=True)
class CompatItem:
    """One compatibility measure: when it applies (from the facts), what it adds, and why."""
    name: str
    applies: Callable[[dict[str, str]], bool]
    kcflags: Callable[[dict[str, str], str], list[str]]   # (facts, compat dir) -> flags
    why: str


def _gcc_major(f: dict[str, str]) -> int:
    m = re.match(r"(\d+)", f.get("GCC_VERSION", ""))
    return int(m.group(1)) if m else 0


def _gcc_shim_missing(f: dict[str, str]) -> bool:
    have = f.get("COMPILER_GCC_HEADERS", "").split()
    return f.get("COMPILER_GCC_SCHEME") == "yes" and \
        f"compiler-gcc{_gcc_major(f)}.h" not in have and bool(have)


COMPAT: tuple[CompatItem, ...] = (
    CompatItem(
        "is-enabled",
        lambda f: f.get("HAS_IS_ENABLED") == "no",
        lambda f, d: ["-include", f"{d}/{COMPAT_HEADER}"],
        "Linux < 3.1 (e.g. RHEL 6's 2.6.32): no IS_ENABLED/IS_BUILTIN/IS_MODULE in the headers; "
        "newer kvm code uses them (\"implicit declaration of function 'IS_ENABLED'\"). Force-"
        "includes compat/kmod/kvmlab-compat.h."),
    CompatItem(
        "no-pie",
        lambda f: f.get("GCC_DEFAULT_PIE") == "yes" and f.get("KERNEL_NO_PIE") == "no",
        lambda f, d: ["-fno-pie"],
        "Linux < 4.9 (no -fno-PIE in its Makefile) built with a gcc >= 6 configured "
        "--enable-default-pie (Debian, Ubuntu): \"cc1: error: code model kernel does not "
        "support PIC mode\"."),
    CompatItem(
        "gnu89",
        lambda f: _gcc_major(f) >= 5 and f.get("KERNEL_STD") == "no",
        lambda f, d: ["-std=gnu89"],
        "Linux < 3.18 (no -std= in its Makefile) built with gcc >= 5, whose default -std=gnu11 "
        "gives 'extern inline' C99 semantics: \"multiple definition of ...\" when the objects of "
        "a module are linked."),
    CompatItem(
        "compiler-gcc-shim",
        _gcc_shim_missing,
        lambda f, d: [f"-I{d}/include"],
        "Linux < 4.2 includes linux/compiler-gcc<__GNUC__>.h: with a newer gcc than the kernel "
        "knows, \"linux/compiler-gcc12.h: No such file or directory\". Adds a compiler-gcc<N>.h "
        "that includes the newest one the headers have (searched after the kernel's own)."),
)


@dataclass(frozen=True)
class CompatPlan:
    items: tuple[str, ...]          # names of the COMPAT items that apply
    kcflags: tuple[str, ...]
    files: dict[str, str]           # relative path (inside the compat dir) -> text

    def to_dict(self) -> dict[str, Any]:
        return {"items": list(self.items), "kcflags": list(self.kcflags),
                "files": sorted(self.files)}


def compat_plan(facts: dict[str, str], compat_src: Path | None, compat_dir: str) -> CompatPlan:
    """What the target needs, from the facts (compat_dir: where the compat files will be in the
    build tree, as the compiler sees it)."""
    names: list[str] = []
    flags: list[str] = []
    files: dict[str, str] = {}
    for item in COMPAT:
        if not item.applies(facts):
            continue
        if item.name == "is-enabled":
            if compat_src is None or not (compat_src / COMPAT_HEADER).is_file():
                raise BuildError("the target headers lack IS_ENABLED but the recipe has no "
                                 "compat directory with " + COMPAT_HEADER,
                                 hint="set [kmod] compat = \"kmod\" (compat/kmod/)")
            files[COMPAT_HEADER] = (compat_src / COMPAT_HEADER).read_text()
        if item.name == "compiler-gcc-shim":
            major = _gcc_major(facts)
            have = sorted(facts["COMPILER_GCC_HEADERS"].split(),
                          key=lambda n: int(re.sub(r"\D", "", n) or 0))
            files[f"include/linux/compiler-gcc{major}.h"] = (
                f"/* kvmlab compat (compiler-gcc-shim): {item.why}\n"
                f" * For: these headers (newest: {have[-1]}) with gcc {major}. */\n"
                f"#include <linux/{have[-1]}>\n")
        names.append(item.name)
        flags += item.kcflags(facts, compat_dir)
    return CompatPlan(tuple(names), tuple(flags), files)



def prefix_map_flags(facts: dict[str, str], tree: Path) -> list[str]:
    """Keep the build directory out of the modules (__FILE__ in WARN_ON/BUG_ON, the assembler's
    debug info of vmenter.S), so the same source gives bit-identical .ko files wherever it is
    built: -ffile-prefix-map (gcc >= 8), else -fdebug-prefix-map (gcc >= 4.3)."""
    opt = "-ffile-prefix-map" if _gcc_major(facts) >= 8 else "-fdebug-prefix-map"
    return [f"{opt}={tree}/="]
