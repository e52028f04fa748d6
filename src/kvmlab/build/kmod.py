"""kmodbuild: kvm.ko + kvm-intel.ko + kvm-amd.ko built from a kernel source as external modules
(``make -C <headers> M=<dir> modules``) in a builder container, for recipes of kind "kmod".

Steps (each a function; ``build_kmod`` runs them all):

1. prepare (container, skipped when its stamp matches): extract the recipe's ``[kmod] dirs``
   (arch/x86/kvm, virt/kvm) from the kernel source into ``work/<recipe>/kmod-src-<builder>/``
   (pristine), check its sha256 and the headers, and record facts about the target headers and
   the compiler (``kvmlab-facts.env``). The source is either a file inside the builder image
   (``kmod.source = "image"``: Debian's /usr/src/linux-source-6.1.tar.xz) or fetched by
   kvmlab.source.fetch (``kmod.source = "fetch"``: a kernel tarball URL + sha256, or an SRPM with
   ``kmod.srpm_tarball``; ``--source PATH`` gives a local tarball or kernel tree).
2. patch (host): copy the pristine tree to ``work/<recipe>/build-<builder>/`` and apply the
   builder's patch series (kvmlab.source.patch: ``FILE if=OPTION`` lines; ``debug-vmx``).
3. compat (host): decide from the facts which compatibility items the target needs (see COMPAT
   and compat/kmod/kvmlab-compat.h) and put them in the build tree.
4. make (container): ``make -C <headers> M=<build>/<module_dir> KCFLAGS=... -jN modules``.
5. collect (host): copy the .ko files to ``out/<recipe>/<builder>/`` with a manifest.json whose
   per-module vermagic/srcversion/depends are read from each .ko's ``.modinfo`` ELF section by
   ``read_modinfo`` (no modinfo binary needed).

The ``load-modules`` side: ``read_modinfo``, ``check_vermagic`` (before any insmod),
``load_order`` (dependencies first: kvm before kvm-intel/kvm-amd) and ``modules_from`` (the .ko
files listed in a build's manifest, checked against their sha256).
"""
from __future__ import annotations

import lzma
import os
import re
import shlex
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmlab.core import ui
from kvmlab.core.errors import BuildError, DockerError, HostError, RecipeError
from kvmlab.core.fsutil import atomic_write_json, read_json, replace_dir, sha256_file, tree_sha256
from kvmlab.core.settings import Settings
from kvmlab.model.recipe import Recipe, load_recipe

MANIFEST = "manifest.json"
FACTS_FILE = "kvmlab-facts.env"
PREPARED_STAMP = ".kvmlab-prepared.json"
COMPAT_DIR = "kvmlab-compat"          # inside the build tree
COMPAT_HEADER = "kvmlab-compat.h"
PREPARE_VERSION = 1                   # bump when the prepare script changes


class VermagicMismatch(HostError):
    """A module was built for another kernel than the one it would be loaded into."""


class ModinfoError(HostError):
    """A file is not a readable kernel module."""


# ============================================================================================
# .modinfo: read from the ELF section, no modinfo binary needed

def _open_module_bytes(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:6] == b"\xfd7zXZ\x00":          # .ko.xz (Debian's installed modules)
        data = lzma.decompress(data)
    elif data[:4] == b"\x28\xb5\x2f\xfd":     # .ko.zst: not in the standard library
        raise ModinfoError(f"{path}: zstd-compressed module; decompress it first (unzstd)")
    return data


def _elf_section(data: bytes, wanted: str, path: Path) -> bytes | None:
    if data[:4] != b"\x7fELF":
        raise ModinfoError(f"{path}: not an ELF file (not a kernel module)")
    cls, enc = data[4], data[5]
    if cls not in (1, 2) or enc not in (1, 2):
        raise ModinfoError(f"{path}: unknown ELF class/encoding {cls}/{enc}")
    e = "<" if enc == 1 else ">"
    try:
        if cls == 2:   # ELF64
            shoff, = struct.unpack_from(e + "Q", data, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x3A)
            shdr = e + "IIQQQQIIQQ"
        else:          # ELF32
            shoff, = struct.unpack_from(e + "I", data, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", data, 0x2E)
            shdr = e + "IIIIIIIIII"
        sections = []
        for i in range(shnum):
            f = struct.unpack_from(shdr, data, shoff + i * shentsize)
            # name, type, flags, addr, offset, size, ...
            sections.append((f[0], f[1], f[4], f[5]))
        _, _, stroff, strsize = sections[shstrndx]
        strtab = data[stroff:stroff + strsize]
        for name_off, sh_type, off, size in sections:
            name = strtab[name_off:strtab.index(b"\0", name_off)].decode("ascii", "replace")
            if name == wanted:
                if sh_type == 8:   # SHT_NOBITS
                    return b""
                return data[off:off + size]
    except (struct.error, IndexError, ValueError) as err:
        raise ModinfoError(f"{path}: truncated or corrupt ELF file ({err})") from None
    return None


def read_modinfo(ko_path: Path | str) -> dict[str, Any]:
    """The key=value strings of a kernel module's .modinfo section (what `modinfo` prints).

    Values are strings; a key that occurs more than once (alias, parm, parmtype, firmware, ...)
    maps to the list of its values in file order. Works on .ko and .ko.xz."""
    path = Path(ko_path)
    try:
        data = _open_module_bytes(path)
    except FileNotFoundError:
        raise ModinfoError(f"module file not found: {path}") from None
    except (OSError, lzma.LZMAError) as err:
        raise ModinfoError(f"cannot read {path}: {err}") from None
    sec = _elf_section(data, ".modinfo", path)
    if sec is None:
        raise ModinfoError(f"{path}: no .modinfo section (not a kernel module)")
    info: dict[str, Any] = {}
    for raw in sec.split(b"\0"):
        if b"=" not in raw:
            continue
        k, v = raw.decode("utf-8", "replace").split("=", 1)
        if k in info:
            if not isinstance(info[k], list):
                info[k] = [info[k]]
            info[k].append(v)
        else:
            info[k] = v
    if "vermagic" not in info:
        raise ModinfoError(f"{path}: .modinfo has no vermagic (not a loadable kernel module)")
    return info


def read_build_id(ko_path: Path | str) -> tuple[str, str]:
    """(GNU build id as hex, the whole .note.gnu.build-id section as hex) of a module; the
    latter is what a loaded module shows in /sys/module/<name>/notes/.note.gnu.build-id, so it
    identifies the exact file that was loaded (modules have no srcversion unless they declare
    MODULE_VERSION or the kernel sets CONFIG_MODULE_SRCVERSION_ALL). ('', '') when absent."""
    path = Path(ko_path)
    try:
        data = _open_module_bytes(path)
    except (OSError, lzma.LZMAError) as err:
        raise ModinfoError(f"cannot read {path}: {err}") from None
    note = _elf_section(data, ".note.gnu.build-id", path)
    if not note or len(note) < 16:
        return "", ""
    e = "<" if data[5] == 1 else ">"
    namesz, descsz, _ = struct.unpack_from(e + "III", note, 0)
    start = 12 + ((namesz + 3) & ~3)
    return note[start:start + descsz].hex(), note.hex()


def external_depends(paths: Iterable[Path | str]) -> list[str]:
    """Modules the given .ko files depend on but do not include (e.g. Debian 6.1's kvm needs
    irqbypass, kvm_amd needs ccp): they must come from the running kernel (modprobe) first."""
    infos = {Path(p): read_modinfo(p) for p in paths}
    have = {module_name(p, i) for p, i in infos.items()}
    out: list[str] = []
    for i in infos.values():
        out += [d for d in _depends(i) if d not in have and d not in out]
    return out


def module_name(ko_path: Path | str, info: dict[str, Any] | None = None) -> str:
    """The module's name as the kernel sees it (kvm_intel for kvm-intel.ko)."""
    if info and isinstance(info.get("name"), str) and info["name"]:
        return info["name"]
    return re.sub(r"\.ko(\.[a-z]+)?$", "", Path(ko_path).name).replace("-", "_")


def _depends(info: dict[str, Any]) -> list[str]:
    d = info.get("depends", "")
    if isinstance(d, list):
        d = ",".join(d)
    return [x.replace("-", "_") for x in d.split(",") if x]


def vermagic_release(vermagic: str) -> str:
    """The kernel release a vermagic string starts with ('6.1.0-50-amd64 SMP ...' -> release)."""
    return vermagic.split()[0] if vermagic.split() else ""


def running_vermagic(release: str, root: Path | str = "/") -> str | None:
    """The vermagic of the running kernel's own modules (from one of its installed modules), or
    None when it has none (no /lib/modules/RELEASE, e.g. a kernel without module support)."""
    base = Path(root) / "lib/modules" / release / "kernel"
    for sub in ("arch/x86/kvm", "virt/lib", "lib", "fs", "drivers"):
        d = base / sub
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*.ko*")):
            if re.search(r"\.ko(\.xz)?$", p.name):
                try:
                    return read_modinfo(p)["vermagic"]
                except ModinfoError:
                    continue
    return None


def check_vermagic(ko_path: Path | str, release: str | None = None, *,
                   root: Path | str = "/") -> dict[str, Any]:
    """Refuse (VermagicMismatch, a HostError) a module built for another kernel release than
    `release` (default: the running kernel, os.uname().release), before any insmod is tried.
    Returns the module's modinfo when it matches."""
    release = release or os.uname().release
    info = read_modinfo(ko_path)
    vm = info["vermagic"].strip()
    built_for = vermagic_release(vm)
    if built_for != release:
        theirs = running_vermagic(release, root) if release == os.uname().release else None
        target = f"vermagic '{theirs.strip()}'" if theirs else f"release {release}"
        raise VermagicMismatch(
            f"{Path(ko_path).name} was built for kernel {built_for} (vermagic '{vm}') but the "
            f"target kernel is {release} ({target}); insmod would fail with "
            "'Invalid module format', so nothing was loaded",
            hint=f"build the modules against the headers of {release} (a kmod recipe whose "
                 f"[kmod] headers are linux-headers-{release}), or boot kernel {built_for}")
    return info


def load_order(paths: Iterable[Path | str]) -> list[Path]:
    """The .ko files in an order insmod accepts: every module after the modules it depends on
    (modinfo 'depends'; kvm before kvm-intel/kvm-amd), otherwise in the order given."""
    items = [Path(p) for p in paths]
    infos: dict[Path, dict[str, Any]] = {}
    for p in items:
        try:
            infos[p] = read_modinfo(p)
        except ModinfoError:
            infos[p] = {}
    names = {p: module_name(p, infos[p]) for p in items}
    by_name = {n: p for p, n in names.items()}

    def deps(p: Path) -> list[str]:
        d = _depends(infos[p]) if infos[p] else []
        if not infos[p] and names[p] != "kvm" and names[p].startswith("kvm"):
            d = ["kvm"]  # unreadable file: fall back to the known kvm dependency
        return [x for x in d if x in by_name]

    out: list[Path] = []
    state: dict[Path, int] = {}

    def visit(p: Path, chain: list[str]) -> None:
        if state.get(p) == 2:
            return
        if state.get(p) == 1:
            raise HostError("modules depend on each other in a cycle: " +
                            " -> ".join(chain + [names[p]]))
        state[p] = 1
        for d in deps(p):
            visit(by_name[d], chain + [names[p]])
        state[p] = 2
        out.append(p)

    for p in items:
        visit(p, [])
    return out


def modules_from(out_dir: Path | str) -> list[Path]:
    """The .ko files a kmod build put in out_dir (from its manifest.json), in load order; each
    checked against the manifest's sha256 (HostError when missing or changed)."""
    out = Path(out_dir)
    if (out / MANIFEST).is_file():
        m = read_json(out / MANIFEST, {}) or {}
    else:
        raise HostError(f"{out} has no {MANIFEST}: not the output of a kmod build",
                        hint="build one with `invoke build --recipe kvm-kmod-6.1`, or pass the "
                             "module files with --ko")
    if m.get("kind") != "kmod":
        raise HostError(f"{out / MANIFEST} is not a kmod build's manifest (kind "
                        f"{m.get('kind')!r})", hint="pass the out/ dir of a kvm-kmod-* recipe")
    paths = []
    for a in m.get("artifacts", []):
        p = out / a["path"]
        if not p.is_file():
            raise HostError(f"{p} is listed in {out / MANIFEST} but missing",
                            hint="rebuild with `invoke build --force`")
        if sha256_file(p) != a["sha256"]:
            raise HostError(f"{p} differs from the sha256 in {out / MANIFEST}",
                            hint="rebuild with `invoke build --force`")
        paths.append(p)
    return load_order(paths)


# ============================================================================================
# the recipe's [kmod] table

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
        if not isinstance(v, typ) or typ is list and not all(isinstance(x, str) for x in v):
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


# ============================================================================================
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


# ============================================================================================
# building

_EXIT_MEANING = {
    3: "the kernel source is not in the builder container (image path or staged file)",
    4: "the kernel headers directory is not in the builder image",
    5: "the kernel source tarball's sha256 differs from the recipe's source.sha256",
    6: "the kernel source has no such directory",
}


def _container_name(recipe: Recipe, builder: str, what: str) -> str:
    return f"kvmlab-kmod-{re.sub(r'[^A-Za-z0-9_.-]', '-', recipe.name)}-{builder}-{what}-" \
           f"{os.getpid()}"


def compat_source(settings: Settings, spec: KmodSpec) -> Path | None:
    """compat/<name>/ of the project (None when the recipe names none)."""
    if not spec.compat:
        return None
    d = settings.home / "compat" / spec.compat
    if not d.is_dir():
        raise BuildError(f"compat directory {d} (from [kmod] compat = {spec.compat!r}) is missing")
    return d


def image_for(settings: Settings, recipe: Recipe, builder: str, *, offline: bool = False,
              client: Any = None, quiet: bool = False) -> Any:
    """The recipe's builder image (builders.<b>.image, e.g. debian12-kmod), built when missing."""
    from kvmlab.build import images
    name = recipe.builder(builder).image or builder
    client = client or images.docker_client()
    if offline:
        try:
            info = images.existing_image(settings, name, client)
        except DockerError:
            info = None
        if info is None:
            raise DockerError(f"builder image {name!r} is missing (and --offline builds no images)",
                              hint=f"run `invoke images --builder {name}`, then build again")
        return info
    if name.startswith("debian12"):   # FROM the local debootstrap base: make sure it exists
        images.ensure_base_image(settings, "debian12", client=client)
    return images.ensure_image(settings, name, client=client, quiet=quiet)


def fetch_kernel_source(settings: Settings, recipe: Recipe, spec: KmodSpec, *,
                        source: str | Path | None = None, offline: bool = False) -> Any:
    """kmod.source = "fetch" (or --source PATH): the kernel tarball/SRPM through kvmlab.source.fetch
    (cache, sha256 pin or lock), or a local kernel tree. None for kmod.source = "image"."""
    if spec.source == "image":
        return None
    from kvmlab.source.fetch import fetch_source
    return fetch_source(settings, recipe, source=source, offline=offline)


def _extract_lines(spec: KmodSpec, strip: int, fetched: Any) -> list[str]:
    """Shell lines extracting spec.dirs from "$S" into the current directory."""
    q = shlex.quote
    if fetched is not None and fetched.kind == "dir":       # a local tree: copy the dirs
        return [f'mkdir -p {q(str(Path(d).parent))} && cp -a "$S"/{q(d)} {q(d)}'
                for d in spec.dirs]
    pats = " ".join(q("*/" + d) if strip else q(d) for d in spec.dirs)
    tar = f"tar -x --wildcards --no-wildcards-match-slash --strip-components={strip} {pats}"
    if spec.source_path.endswith(".src.rpm") or (fetched is not None and
                                                  fetched.file.endswith(".src.rpm")):
        if not spec.srpm_tarball:
            raise RecipeError("the source is an SRPM: set [kmod] srpm_tarball to the kernel "
                              "tarball inside it (e.g. linux-2.6.32-754.el6.tar.bz2)")
        t = q(spec.srpm_tarball)
        return [f'echo "+ rpm2cpio $S | cpio -i --to-stdout {t} | {tar}"',
                f'rpm2cpio "$S" | cpio -i --quiet --to-stdout {t} > .kvmlab-kernel.tar',
                f'[ -s .kvmlab-kernel.tar ] || {{ echo "kvmlab: no {t} in $S"; exit 6; }}',
                f"{tar} -f .kvmlab-kernel.tar", "rm -f .kvmlab-kernel.tar"]
    return ['echo "+ tar -xf $S (' + " ".join(spec.dirs) + ')"', f'{tar} -f "$S"']


def prepare_source(settings: Settings, recipe: Recipe, spec: KmodSpec, builder: str, image: Any,
                   client: Any, sink: Any, *, force: bool = False, fetched: Any = None,
                   timeout: float = 3600) -> tuple[Path, dict[str, str]]:
    """Extract spec.dirs from the kernel source (in the image, or fetched: kvmlab.source.fetch's
    FetchResult) to work/<recipe>/kmod-src-<builder> (pristine; skipped when its stamp matches)
    and gather the facts in the builder. Returns (dir, facts)."""
    from kvmlab.build.qemu import _run_container
    wdir = settings.work(recipe.name)
    pristine = wdir / f"kmod-src-{builder}"
    src_sha = fetched.sha256 if fetched is not None else spec.source_sha256
    stamp = {"v": PREPARE_VERSION, "image_id": image.id,
             "source": spec.source_path if fetched is None else fetched.file,
             "source_sha256": src_sha, "dirs": list(spec.dirs), "headers": spec.headers}
    if not force and read_json(pristine / PREPARED_STAMP, None) == stamp:
        return pristine, parse_facts((pristine / FACTS_FILE).read_text())
    wdir.mkdir(parents=True, exist_ok=True)
    tmp = wdir / f".kmod-src-{builder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    q = shlex.quote
    strip = recipe.source.strip_components
    staged: Path | None = None
    try:
        if fetched is None:
            spath = spec.source_path
        elif fetched.kind == "dir":     # only the kvm dirs are needed: stage those
            staged = wdir / ".kmod-source-tree"
            shutil.rmtree(staged, ignore_errors=True)
            for d in spec.dirs:
                if not (Path(fetched.path) / d).is_dir():
                    raise BuildError(f"--source {fetched.path} has no {d}/ (kmod.dirs)")
                shutil.copytree(Path(fetched.path) / d, staged / d, symlinks=True)
            spath = str(staged)
        else:                           # the cached, verified file, visible in the container
            staged = wdir / f".kmod-source-{fetched.file}"
            staged.unlink(missing_ok=True)
            try:
                os.link(fetched.path, staged)
            except OSError:
                shutil.copy2(fetched.path, staged)
            spath = str(staged)
        check = "-d" if fetched is not None and fetched.kind == "dir" else "-f"
        lines = ["set -e", f"S={q(spath)}", f"H={q(spec.headers)}",
                 f'[ {check} "$S" ] || {{ echo "kvmlab: $S: not in the container"; exit 3; }}',
                 '[ -d "$H" ] || { echo "kvmlab: $H: no such directory in the image"; exit 4; }']
        if fetched is None and recipe.source.pinned:
            lines.append(f'echo "{spec.source_sha256}  $S" | sha256sum -c - || exit 5')
        lines.append(facts_script(spec, f"{tmp}/{FACTS_FILE}"))
        if fetched is None:
            lines.append(f'echo "SOURCE_SHA256=$(sha256sum "$S" | cut -d" " -f1)" >> '
                         f'{q(str(tmp))}/{FACTS_FILE}')
        lines += [f"cd {q(str(tmp))}", *_extract_lines(spec, strip, fetched)]
        lines += [f'[ -d {q(d)} ] || {{ echo "kvmlab: no {d} in $S"; exit 6; }}'
                  for d in spec.dirs]
        ui.info(f"extracting {', '.join(spec.dirs)} from "
                f"{spec.source_path if fetched is None else fetched.path} in {image.ref}")
        rc = _run_container(client, image.ref, wdir, "\n".join(lines), {"LC_ALL": "C"}, sink,
                            _container_name(recipe, builder, "prepare"), timeout)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if staged is not None:
            if staged.is_dir():
                shutil.rmtree(staged, ignore_errors=True)
            else:
                staged.unlink(missing_ok=True)
    if rc != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        sink.show_tail()
        raise BuildError(f"preparing the kernel source failed (exit {rc}): "
                         f"{_EXIT_MEANING.get(rc, 'see the log')}",
                         hint=f"log: {sink.path}; image {image.ref} (docker/"
                              f"{recipe.builder(builder).image or builder}/Dockerfile)")
    facts = parse_facts((tmp / FACTS_FILE).read_text())
    if fetched is not None:
        facts["SOURCE_SHA256"] = fetched.sha256
    problems = []
    if facts.get("UTS_RELEASE") != spec.kernel_release:
        problems.append(f"the headers are for {facts.get('UTS_RELEASE')!r}, the recipe says "
                        f"kmod.kernel_release = {spec.kernel_release!r}")
    pkgs = [("HEADERS_PACKAGE_VERSION", spec.headers_package)]
    if fetched is None:   # the source is a package in the image too: same version
        pkgs.append(("SOURCE_PACKAGE_VERSION", spec.source_package))
    for key, what in pkgs:
        if spec.package_version and what and facts.get(key) != spec.package_version:
            problems.append(f"{what} in the image is {facts.get(key) or 'not installed'!r}, the "
                            f"recipe says kmod.package_version = {spec.package_version!r}")
    if problems:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError("the builder image does not match the recipe: " + "; ".join(problems),
                         hint="source and headers must be the same kernel version: align the "
                              "Dockerfile's pinned versions and the recipe's [kmod] table")
    atomic_write_json(tmp / PREPARED_STAMP, stamp)
    replace_dir(tmp, pristine)
    return pristine, facts


def kbuild_wrapper(makefile_text: str, tree: Path, exists_in: Path | None = None) -> str:
    """A Kbuild file for <tree>/<module_dir> (kbuild prefers Kbuild over Makefile): the directory's
    own Makefile with every $(srctree)/PATH that exists in our tree (not in the headers) pointed
    at the tree, e.g. 6.1's `include $(srctree)/virt/kvm/Makefile.kvm` and
    `-I $(srctree)/arch/x86/kvm`. exists_in: where the tree is now (default: tree)."""
    def repl(m: re.Match) -> str:
        rel = m.group(1)
        return f"$(KVMLAB_SRC)/{rel}" if ((exists_in or tree) / rel).exists() else m.group(0)
    body = re.sub(r"\$\(srctree\)/([\w./+-]+)", repl, makefile_text)
    return ("# Generated by kvmlab (kmodbuild.kbuild_wrapper): this directory's Makefile, built\n"
            "# outside the kernel tree, with $(srctree)/ paths that only exist here redirected.\n"
            f"KVMLAB_SRC := {tree}\n\n" + body)


def _expand(flags: Iterable[str], tree: Path) -> list[str]:
    return [f.replace("{src}", str(tree)) for f in flags]


def prefix_map_flags(facts: dict[str, str], tree: Path) -> list[str]:
    """Keep the build directory out of the modules (__FILE__ in WARN_ON/BUG_ON, the assembler's
    debug info of vmenter.S), so the same source gives bit-identical .ko files wherever it is
    built: -ffile-prefix-map (gcc >= 8), else -fdebug-prefix-map (gcc >= 4.3)."""
    opt = "-ffile-prefix-map" if _gcc_major(facts) >= 8 else "-fdebug-prefix-map"
    return [f"{opt}={tree}/="]


def build_kmod(settings: Settings, recipe: Recipe | str, builder: str, *, jobs: int = 2,
               force: bool = False, source: str | Path | None = None, offline: bool = False,
               quiet: bool = False, timeout: float | None = None) -> Any:
    """Build a kind = "kmod" recipe: returns kvmlab.build.qemu.BuildResult(out_dir, manifest, noop)."""
    from kvmlab.build import images
    from kvmlab.build.qemu import (
        CCACHE_DIR,
        CONTAINER_PATH,
        DEFAULT_TIMEOUT,
        BuildResult,
        _LogSink,
        _run_container,
        _sha,
        build_dir,
        log_path,
    )
    from kvmlab.core.proc import sigterm_as_interrupt
    from kvmlab.source.patch import apply_series, read_series
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    if isinstance(recipe, str):
        recipe = load_recipe(settings.recipes_dir, recipe)
    spec = kmod_spec(recipe)
    recipe.builder(builder)  # RecipeError for an unknown builder
    if builder == "native":
        raise BuildError("kmod recipes build in their builder image, not with --builder native",
                         hint=f"use --builder {next(iter(recipe.builders), 'debian12')}")
    if source and spec.source == "image":
        raise BuildError(f"--source does not apply to {recipe.name}: its kernel source is inside "
                         "the builder image (kmod.source = \"image\")")
    if jobs < 1:
        raise BuildError(f"--jobs must be at least 1, got {jobs}")
    entries = read_series(settings.patches_dir, recipe, builder)
    csrc = compat_source(settings, spec)
    fetched = fetch_kernel_source(settings, recipe, spec, source=source, offline=offline)
    client = images.docker_client()
    image = image_for(settings, recipe, builder, offline=offline, client=client, quiet=quiet)
    out = settings.out(recipe.name, builder)
    bdir = build_dir(settings, recipe.name, builder)
    if re.search(r"\s", str(bdir)):
        raise BuildError(f"the build directory {bdir} contains whitespace, which KCFLAGS cannot "
                         "carry", hint="set KVMLAB_STATE_DIR to a path without spaces")
    patches = [e.record() for e in entries if e.active]
    inputs = {"recipe_sha256": recipe.sha256, "image_id": image.id, "builder": builder,
              "source_sha256": fetched.sha256 if fetched is not None else spec.source_sha256,
              "patches": patches, "compat": tree_sha256(csrc) if csrc else None,
              "options": {k: recipe.options[k] for k in sorted(recipe.options)}}
    inputs_sha = _sha(inputs)
    recorded = read_json(out / MANIFEST, None)
    if not force and recorded and recorded.get("inputs_sha256") == inputs_sha \
            and modules_intact(out, recorded):
        ui.info(f"[cyan]no-op[/cyan]: {recipe.name} ({builder}) is up to date; modules in {out}")
        return BuildResult(out, recorded, True)

    settings.work(recipe.name).mkdir(parents=True, exist_ok=True)
    log = log_path(settings, recipe.name, builder)
    t0 = time.monotonic()
    sink = _LogSink(log, quiet=quiet)
    tmp = None
    try:
        with sigterm_as_interrupt():
            pristine, facts = prepare_source(settings, recipe, spec, builder, image, client, sink,
                                             force=force, fetched=fetched, timeout=timeout)
            t_prep = time.monotonic() - t0
            # fresh build tree: pristine copy + series + compat files + Kbuild wrapper
            tmp: Path | None = bdir.with_name(f".{bdir.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(pristine, tmp, symlinks=True)
            (tmp / PREPARED_STAMP).unlink(missing_ok=True)
            apply_series(tmp, entries)
            compat_dir = bdir / COMPAT_DIR
            plan = compat_plan(facts, csrc, str(compat_dir))
            for rel, text in plan.files.items():
                p = tmp / COMPAT_DIR / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(text)
            kcflags = _expand(spec.kcflags, bdir) + list(plan.kcflags) + \
                prefix_map_flags(facts, bdir)
            for f in kcflags:   # directories named in kcflags (include/trace) must exist
                if f.startswith(str(bdir) + "/") and "=" not in f:
                    (tmp / Path(f).relative_to(bdir)).mkdir(parents=True, exist_ok=True)
            mk = tmp / spec.module_dir / "Makefile"
            if mk.is_file() and not (tmp / spec.module_dir / "Kbuild").exists():
                (tmp / spec.module_dir / "Kbuild").write_text(
                    kbuild_wrapper(mk.read_text(), bdir, tmp))
            replace_dir(tmp, bdir)
            tmp = None
            make = ["make", "-C", spec.headers, f"M={bdir / spec.module_dir}", f"-j{jobs}",
                    "KCFLAGS=" + " ".join(kcflags),
                    "KAFLAGS=" + " ".join(prefix_map_flags(facts, bdir)), "modules"]
            script = "\n".join([
                "set -e",
                "gcc --version 2>/dev/null | head -n 1 > .kvmlab-compiler || true",
                "echo " + shlex.quote("+ " + " ".join(shlex.quote(a) for a in make)),
                " ".join(shlex.quote(a) for a in make)])
            env = {"CCACHE_DIR": CCACHE_DIR, "PATH": CONTAINER_PATH, "HOME": "/tmp",
                   "LC_ALL": "C"}   # no CCACHE_BASEDIR: it would rewrite paths to relative
            if plan.items:
                ui.info("compat for this target: " + ", ".join(plan.items))
            ui.info(f"building {recipe.name} with {builder} ({image.ref}) in {bdir}; log: {log}")
            t1 = time.monotonic()
            rc = _run_container(client, image.ref, bdir, script, env, sink,
                                _container_name(recipe, builder, "make"), timeout)
            t_make = time.monotonic() - t1
            sink.close()
            if rc != 0:
                sink.show_tail()
                raise BuildError(f"building the modules of {recipe.name} with {builder} failed "
                                 f"(exit {rc})", hint=f"full log: {log}; build tree: {bdir}")
            cfile = bdir / ".kvmlab-compiler"
            manifest = {
                "recipe": recipe.name, "kind": "kmod", "recipe_sha256": recipe.sha256,
                "builder": builder, "image": image.ref, "image_id": image.id,
                "source_sha256": facts.get("SOURCE_SHA256") or spec.source_sha256,
                "source": {"package": spec.source_package,
                           "version": facts.get("SOURCE_PACKAGE_VERSION", ""),
                           "path": spec.source_path if fetched is None else str(fetched.path),
                           "origin": "image" if fetched is None else fetched.origin,
                           "dirs": list(spec.dirs)},
                "headers": {"package": spec.headers_package,
                            "version": facts.get("HEADERS_PACKAGE_VERSION", ""),
                            "dir": spec.headers, "release": facts.get("UTS_RELEASE", "")},
                "kernel_release": spec.kernel_release,
                "patches": patches, "options": inputs["options"],
                "compat": plan.to_dict(), "facts": facts,
                "kcflags": list(spec.kcflags), "make": make,
                "compiler": cfile.read_text(errors="replace").strip() if cfile.is_file() else "",
                "build_dir": str(bdir), "log": str(log), "inputs_sha256": inputs_sha,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "seconds": {"prepare": round(t_prep, 1), "make": round(t_make, 1),
                            "total": round(time.monotonic() - t0, 1)},
            }
            manifest = collect_modules(recipe, spec, bdir, out, manifest)
    finally:
        if not sink._f.closed:
            sink.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    ui.info(f"[green]built[/green] {recipe.name} ({builder}) in {time.monotonic() - t0:.0f} s: "
            + ", ".join(f"{a['path']} ({a['vermagic'].split()[0]})"
                        for a in manifest["artifacts"]) + f" in {out}")
    return BuildResult(out, manifest, False)


def modules_intact(out: Path, manifest: dict) -> bool:
    """Every module the manifest lists is in out/ with its recorded size and sha256."""
    try:
        arts = manifest["artifacts"]
        return bool(arts) and all((out / a["path"]).is_file() and
                                  (out / a["path"]).stat().st_size == a["size"] and
                                  sha256_file(out / a["path"]) == a["sha256"] for a in arts)
    except (OSError, KeyError, TypeError):
        return False


def collect_modules(recipe: Recipe, spec: KmodSpec, bdir: Path, out: Path,
                    manifest: dict) -> dict:
    """Copy the recipe's modules to out/ (all or nothing) with the manifest; every module's
    vermagic must name the recipe's kernel release."""
    import json
    missing = [rel for rel in recipe.artifacts["modules"] if not (bdir / rel).is_file()]
    if missing:
        raise BuildError(f"the build finished but {', '.join(missing)} were not built",
                         hint=f"check the headers' CONFIG_KVM* options and {bdir}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        arts = []
        for rel in recipe.artifacts["modules"]:
            dest = tmp / Path(rel).name
            shutil.copy2(bdir / rel, dest)
            info = read_modinfo(dest)
            if vermagic_release(info["vermagic"]) != spec.kernel_release:
                raise BuildError(f"{rel} has vermagic {info['vermagic']!r}, not for "
                                 f"{spec.kernel_release}", hint="the headers are not the "
                                 "recipe's: check [kmod] headers / kernel_release")
            st = dest.stat()
            build_id, note = read_build_id(dest)
            arts.append({"path": dest.name, "kind": "module", "source": rel,
                         "name": module_name(dest, info), "vermagic": info["vermagic"],
                         "srcversion": info.get("srcversion", ""), "depends": _depends(info),
                         "build_id": build_id, "build_id_note": note,
                         "license": info.get("license", ""), "sha256": sha256_file(dest),
                         "size": st.st_size, "mode": "%04o" % (st.st_mode & 0o7777)})
        manifest = {**manifest, "artifacts": arts}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
