"""The qemu binaries tests use, found explicitly (never PATH's first hit, never /usr/local).

- the distribution's qemu: what the Debian packages installed (``kvmlab.qemu.binary.distro_qemu``
  asks dpkg), so a qemu-kvm 0.12 that `invoke lab` put into /usr/local/bin does not stand in for it;
- a qemu-kvm 0.12 build: ``$KVMLAB_TEST_QEMU_012`` when set, else built by kvmlab itself
  (``invoke build`` in the debian12 builder) from the real upstream release tarball into a
  temporary state directory. The tarball is ``$KVMLAB_TEST_QEMU_012_TARBALL`` or
  ``shared/sources/qemu-kvm-0.12.1.2.tar.gz`` next to the checkout (``../shared/sources``; for a
  git worktree at ``X/wt/NAME`` also ``X/shared/sources``). What /usr/local holds never matters.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = "qemu-kvm-0.12.1.2"
TARBALL = f"{RECIPE}.tar.gz"
BUILD_TIMEOUT = 1800


@dataclass(frozen=True)
class Qemu012:
    qemu: Path           # qemu-system-x86_64 of a qemu-kvm 0.12 build
    qemu_img: Path       # its qemu-img (0.12: no --output=json, no qcow2 v3)
    how: str             # where it came from, for messages


def tarball_candidates() -> list[Path]:
    env = os.environ.get("KVMLAB_TEST_QEMU_012_TARBALL")
    if env:
        return [Path(env)]
    return [d / "shared" / "sources" / TARBALL for d in (REPO.parent, REPO.parent.parent)]


def find_tarball() -> Path | None:
    return next((p for p in tarball_candidates() if p.is_file()), None)


def _is_012(qemu: Path) -> bool:
    from kvmlab.qemu.binary import probe_qemu
    return probe_qemu(qemu).version_tuple < (1, 0, 0)


def from_env() -> Qemu012 | None:
    """$KVMLAB_TEST_QEMU_012 (a qemu-system-x86_64 of a 0.12 build; its qemu-img next to it or
    in the build tree above it). A value that is not a 0.12 build is an error, not a skip."""
    value = os.environ.get("KVMLAB_TEST_QEMU_012")
    if not value:
        return None
    q = Path(value).resolve()
    if not _is_012(q):
        raise AssertionError(f"KVMLAB_TEST_QEMU_012={value} is not a qemu-kvm 0.12 binary")
    img = next((c for c in (q.parent / "qemu-img", q.parent.parent / "qemu-img") if c.is_file()),
               None)
    if img is None:
        raise AssertionError(f"no qemu-img next to KVMLAB_TEST_QEMU_012={value}")
    return Qemu012(q, img, f"KVMLAB_TEST_QEMU_012={value}")


def build(tarball: Path, base: Path, flavour: str = "release") -> Qemu012:
    """kvmlab's own build of the release tarball (debian12 builder) into state under ``base``.

    The builder image and the ccache volume are shared with other runs (docker objects named by
    their inputs), so this takes ~45-70 s once they exist. Raises AssertionError with the log
    tail when the build fails.
    """
    state = base / "state"
    state.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KVMLAB_HOME": str(REPO), "KVMLAB_STATE_DIR": str(state),
           "KVMLAB_CACHE": str(base / "cache"), "KVMLAB_LOCK": str(state / "kvmlab.lock")}
    for k in ("KVMLAB_RECIPE", "KVMLAB_BUILDER", "KVMLAB_RECIPES_DIR", "KVMLAB_PATCHES_DIR",
              "KVMLAB_DEBUG"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "invoke", "build", "--recipe", RECIPE,
                        "--builder", "debian12", "--source", str(tarball), "--no-verify",
                        "--flavour", flavour],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    out = state / "out" / RECIPE / ("debian12-debug" if flavour == "debug" else "debian12") / "bin"
    if p.returncode != 0 or not (out / "qemu-system-x86_64").is_file():
        raise AssertionError(f"building {tarball} failed (exit {p.returncode}):\n"
                             f"{p.stdout[-3000:]}\n{p.stderr[-2000:]}")
    q = out / "qemu-system-x86_64"
    if not _is_012(q):
        raise AssertionError(f"{q} built from {tarball} does not say it is 0.12")
    return Qemu012(q, out / "qemu-img", f"built from {tarball}")


def unavailable_reason() -> str | None:
    """Why no 0.12 build can be had here (None when one can): only for a skip message."""
    if os.environ.get("KVMLAB_TEST_QEMU_012"):
        return None
    if find_tarball() is None:
        return ("no qemu-kvm 0.12 source to build: none of " +
                ", ".join(str(p) for p in tarball_candidates()) +
                " exists (or set KVMLAB_TEST_QEMU_012 to a build's qemu-system-x86_64)")
    from support.build import docker_available
    why = docker_available()
    if why:
        return f"cannot build qemu-kvm 0.12 from {find_tarball()}: {why}"
    return None
