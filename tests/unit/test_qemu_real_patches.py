"""The qemu-kvm 0.12.1.2 compatibility series: series files, headers and hunks are sound.

The patches themselves were checked against the real release tree by hand (see their headers);
these tests keep the series usable without that tree: every listed file exists and passes the
pipeline's header lint, the right patches are active per builder and option, and every hunk is
well formed (it applies with no fuzz to a file made of its own context/removed lines).
"""
from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from kvmlab.model.recipe import load_recipe
from kvmlab.source.patch import read_series

REPO = Path(__file__).resolve().parents[2]
RECIPE = "qemu-kvm-0.12.1.2"
PATCHES = REPO / "patches"
COMPAT = ["0001-vnc-tls-gnutls-priority-string.patch",
          "0002-configure-curses-probe-int-conversion.patch"]
DEBUG = "debug-bios-path.patch"
# the header fields every patch here carries (kvmlab.source.patch lints its own required subset)
FIELDS = ("Subject", "Fixes", "For", "Failing-log", "Upstream")


def _recipe(**options):
    r = load_recipe(REPO / "recipes", RECIPE)
    return dataclasses.replace(r, options={**r.options, **options}) if options else r


def _active(builder: str, **options) -> list[str]:
    return [e.name for e in read_series(PATCHES, _recipe(**options), builder) if e.active]


def _all_patches() -> list[Path]:
    return sorted((PATCHES / RECIPE).glob("*.patch"))


def test_debug_bios_path_is_off_by_default():
    assert _recipe().option("debug-bios-path") is False


@pytest.mark.parametrize("builder", ["debian12", "native"])
def test_current_toolchain_builders_get_the_compat_series(builder):
    assert _active(builder) == COMPAT
    assert _active(builder, **{"debug-bios-path": True}) == COMPAT + [DEBUG]


def test_centos6_gets_only_the_optional_diagnostic():
    assert _active("centos6") == []
    assert _active("centos6", **{"debug-bios-path": True}) == [DEBUG]


def test_every_patch_file_is_listed_in_a_series():
    listed = set()
    for series in (PATCHES / RECIPE).glob("series*"):
        for line in series.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words:
                listed.add(words[0])
    assert {p.name for p in _all_patches()} == listed


@pytest.mark.parametrize("patch", _all_patches(), ids=lambda p: p.name)
def test_header_fields(patch):
    header = re.split(r"^--- ", patch.read_text(), maxsplit=1, flags=re.M)[0]
    fields = {}
    for line in header.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in FIELDS and key not in fields:
            fields[key] = value.strip()
    missing = [f for f in FIELDS if not fields.get(f)]
    assert not missing, f"{patch.name}: header lacks {missing}"
    assert re.match(r"^(https?://\S+|N/A:\s*\S.*)$", fields["Upstream"])


def _old_sides(patch_text: str) -> dict[str, list[str]]:
    """file -> the lines each hunk expects (context + removed), hunks in order."""
    files: dict[str, list[str]] = {}
    current = None
    for line in patch_text.splitlines():
        if line.startswith("--- a/"):
            current = files.setdefault(line[6:].split("\t")[0], [])
        elif line.startswith("@@") or line.startswith("+++"):
            continue
        elif current is not None and line[:1] in (" ", "-"):
            current.append(line[1:])
    return files


@pytest.mark.parametrize("patch", _all_patches(), ids=lambda p: p.name)
def test_hunks_are_well_formed(tmp_path, patch):
    """patch -F0 accepts the hunks against their own old side (only line offsets differ), so the
    hunk line counts and context are consistent; a hand edit that breaks them fails here."""
    text = patch.read_text()
    for name, lines in _old_sides(text).items():
        f = tmp_path / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("\n".join(lines) + "\n")
    proc = subprocess.run(["patch", "-p1", "-F0", "-N", "--batch", "-i", str(patch)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fuzz" not in proc.stdout
    added = [ln[1:] for ln in text.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    patched = "".join((tmp_path / n).read_text() for n in _old_sides(text))
    assert all(a in patched for a in added)
