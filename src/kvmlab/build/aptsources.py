"""The host's apt sources: which Debian mirror the locally made base image is debootstrapped from.

Reads sources.list, sources.list.d/*.list (one-line format) and *.sources (deb822);
``KVMLAB_DEBIAN_MIRROR`` overrides what they say.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmlab.core.errors import DockerError

DEBIAN_SUITE = "bookworm"


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str = ""
    origin: str = ""


def _parse_one_line(line: str, origin: str) -> AptSource | None:
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    opts = ""
    m = re.match(r"^(deb)\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
    if not m:
        return None
    opts = (m.group(2) or "").strip("[] \t")
    signed = ""
    for o in opts.split():
        if o.startswith("signed-by="):
            signed = o.split("=", 1)[1]
    return AptSource(uri=m.group(3), suites=(m.group(4),), components=tuple(m.group(5).split()),
                     signed_by=signed, origin=origin)


def _parse_deb822(text: str, origin: str) -> list[AptSource]:
    out: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#") or not raw.strip():
                continue
            if raw[0] in " \t" and key:
                fields[key] += "\n" + raw.strip()
                continue
            if ":" in raw:
                key, val = raw.split(":", 1)
                key = key.strip().lower()
                fields[key] = val.strip()
        if not fields:
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        signed = fields.get("signed-by", "")
        if "\n" in signed:  # inline key block: not a path
            signed = ""
        for uri in fields.get("uris", "").split():
            out.append(AptSource(uri=uri, suites=tuple(fields.get("suites", "").split()),
                                 components=tuple(fields.get("components", "").split()),
                                 signed_by=signed, origin=origin))
    return out


def host_apt_sources(root: Path = Path("/etc/apt")) -> list[AptSource]:
    """Every enabled `deb` source of the host: sources.list, sources.list.d/*.list and *.sources."""
    out: list[AptSource] = []
    files: list[Path] = []
    if (root / "sources.list").is_file():
        files.append(root / "sources.list")
    d = root / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            out += _parse_deb822(text, str(f))
        else:
            out += [s for s in (_parse_one_line(ln, str(f)) for ln in text.splitlines()) if s]
    return out


def debian_mirror(suite: str = DEBIAN_SUITE, root: Path = Path("/etc/apt")) -> AptSource:
    """The host's mirror carrying `suite` main (KVMLAB_DEBIAN_MIRROR overrides it)."""
    env = os.environ.get("KVMLAB_DEBIAN_MIRROR", "").strip()
    if env:
        return AptSource(uri=env, suites=(suite,), components=("main",),
                         origin="KVMLAB_DEBIAN_MIRROR")
    for s in host_apt_sources(root):
        if suite in s.suites and "main" in s.components and s.uri.startswith(("http://", "https://",
                                                                                "file:/")):
            return s
    raise DockerError(f"no apt source for Debian {suite} main found in {root}/sources.list(.d)",
                      hint="set KVMLAB_DEBIAN_MIRROR=http://<your debian mirror>/debian")
