"""Runtime dependencies of built binaries: each DT_NEEDED soname -> library file -> package.

manifest.json "runtime_deps": one entry per DT_NEEDED soname of the ELF artifacts --
``{soname, needed_by: [artifact paths], builder_path, builder_package, runtime_package}`` --
found by one ldd + ``dpkg -S`` (``rpm -qf`` in a centos builder, the host's for native) run
after the build; runtime_package is the Debian package to install on a Debian host (the dpkg
owner without its ``:arch``; None for rpm builders). install checks them before copying.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from kvmlab.build.containers import CONTAINER_PATH, LogSink, build_binds, run_in_container
from kvmlab.core import proc
from kvmlab.core.errors import BuildError

RUNTIME_DEPS = "runtime_deps"     # manifest key: what the artifacts need at run time
DEPS_TIMEOUT = 300.0


def deps_script(binaries: list[str]) -> str:
    """POSIX sh run once in the builder (or on the host for native): ldd of every binary, the
    real path of each library it resolved, and which package owns it (dpkg -S or rpm -qf). Each
    section starts with a @@ marker line; parse_deps_output reads it. Library paths are assumed
    to contain no blanks (they never do in a distribution)."""
    bins = " ".join(shlex.quote(b) for b in binaries)
    return "\n".join([
        "LC_ALL=C; export LC_ALL",
        f"for b in {bins}; do echo \"@@ldd $b\"; ldd \"$b\" 2>&1; done",
        f"paths=$(for b in {bins}; do ldd \"$b\" 2>/dev/null; done"
        " | sed -n 's#^[^/]*=> \\(/[^ ]*\\) (.*#\\1#p' | sort -u)",
        "cands=''",
        "echo @@real",
        "for p in $paths; do",
        "  r=$(readlink -f \"$p\"); echo \"$p $r\"",
        "  for q in \"$p\" \"$r\"; do",
        "    case \"$q\" in /usr/lib*) a=${q#/usr} ;; /lib*) a=/usr$q ;; *) a=$q ;; esac",
        "    cands=\"$cands $q $a\"",
        "  done",
        "done",
        "if command -v dpkg >/dev/null 2>&1; then",
        "  echo '@@owners dpkg'; [ -n \"$cands\" ] && dpkg -S $cands 2>/dev/null",
        "elif command -v rpm >/dev/null 2>&1; then",
        "  echo '@@owners rpm'",
        "  for q in $cands; do o=$(rpm -qf --qf '%{NAME}\\n' \"$q\" 2>/dev/null) &&"
        " echo \"$o: $q\"; done",
        "else",
        "  echo '@@owners none'",
        "fi",
        "echo @@end",
        "exit 0",
    ])


def _merged_alt(p: str) -> str:
    if p.startswith("/usr/lib"):
        return p[len("/usr"):]
    if p.startswith("/lib"):
        return "/usr" + p
    return p


def parse_deps_output(text: str) -> tuple[dict[str, str | None], dict[str, str], str,
                                          dict[str, str]]:
    """(soname -> library path ldd resolved, or None when "not found"; path -> real path;
    package manager; path -> owning package) from deps_script's output."""
    resolved: dict[str, str | None] = {}
    real: dict[str, str] = {}
    owners: dict[str, str] = {}
    manager, section = "none", ""
    for line in text.splitlines():
        if line.startswith("@@"):
            section = line[2:].split(" ", 1)[0]
            if section == "owners":
                manager = line.split()[1] if len(line.split()) > 1 else "none"
            continue
        if section == "ldd":
            m = re.match(r"^\s*(\S+)\s+=>\s+(?:(/\S+)\s+\(|not found)", line)
            if m and not (m.group(1) in resolved and resolved[m.group(1)]):
                resolved[m.group(1)] = m.group(2)
        elif section == "real":
            parts = line.split()
            if len(parts) == 2:
                real[parts[0]] = parts[1]
        elif section == "owners" and ": /" in line and not line.startswith("diversion "):
            pkgs, path = line.split(": /", 1)
            owners.setdefault("/" + path.strip(), pkgs.split(",")[0].strip())
    return resolved, real, manager, owners


def runtime_deps(elves: list[tuple[str, list[str]]], output: str) -> list[dict[str, Any]]:
    """The manifest's runtime_deps list: one entry per soname any artifact needs.

    elves: (artifact path, its DT_NEEDED) pairs; output: what deps_script printed. Every soname
    is kept, libc.so.6 included: dropping the C library would hide a target that really lacks it
    (musl, another arch), and a present library costs the install check nothing. The ELF
    interpreter (PT_INTERP) is not a DT_NEEDED entry and is not listed."""
    resolved, real, manager, owners = parse_deps_output(output)
    by_soname: dict[str, list[str]] = {}
    for art, needed in elves:
        for so in needed:
            by_soname.setdefault(so, []).append(art)
    out = []
    for so in sorted(by_soname):
        path = resolved.get(so)
        pkg = None
        if path:
            r = real.get(path, path)
            for cand in (path, _merged_alt(path), r, _merged_alt(r)):
                if cand in owners:
                    pkg = owners[cand]
                    break
        runtime = pkg.split(":", 1)[0] if pkg and manager == "dpkg" else None
        out.append({"soname": so, "needed_by": sorted(by_soname[so]), "builder_path": path,
                    "builder_package": pkg, "runtime_package": runtime})
    return out


def deps_native(bins: list[str], timeout: float = DEPS_TIMEOUT) -> str:
    """deps_script's output on this host (the native builder)."""
    try:
        r = proc.run(["/bin/sh", "-c", deps_script(bins)], timeout=timeout)
    except proc.CommandTimeout:
        raise BuildError(f"reading the artifacts' runtime dependencies timed out after "
                         f"{timeout:.0f} s") from None
    return str(r.stdout)


def deps_container(client: Any, image: str, bdir: Path, bins: list[str], log: Path,
                   name: str, timeout: float = DEPS_TIMEOUT) -> str:
    """deps_script's output in the builder image, with the build tree where it was built."""
    sink = LogSink(log, quiet=True)
    try:
        rc = run_in_container(client, image, deps_script(bins), workdir=bdir,
                              binds=build_binds(bdir),
                              env={"LC_ALL": "C", "PATH": CONTAINER_PATH, "HOME": "/tmp"},
                              sink=sink, name=name, timeout=timeout)
    finally:
        sink.close()
    text = log.read_text(errors="replace")
    if rc != 0 or "@@end" not in text:
        raise BuildError(f"could not read the artifacts' runtime dependencies in the builder "
                         f"(exit {rc})", hint=f"see {log}")
    return text
