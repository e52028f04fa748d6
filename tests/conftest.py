"""Fixtures shared by unit and integration tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def kvmlab_env(tmp_path, monkeypatch):
    """An isolated kvmlab: state, cache and lock under tmp_path; recipes/patches from the repo.

    Returns the resolved Settings. Tests that need their own recipes set KVMLAB_HOME themselves.
    """
    from kvmlab.core.settings import load_settings
    state = tmp_path / "state"
    cache = tmp_path / "cache"
    state.mkdir()
    monkeypatch.setenv("KVMLAB_HOME", str(REPO))
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(state))
    monkeypatch.setenv("KVMLAB_CACHE", str(cache))
    monkeypatch.setenv("KVMLAB_LOCK", str(state / "kvmlab.lock"))
    # hermetic: never the ssh host keys of whoever runs the tests
    monkeypatch.setenv("KVMLAB_USER_KNOWN_HOSTS", str(tmp_path / "user-known_hosts"))
    monkeypatch.delenv("KVMLAB_DEBUG", raising=False)
    return load_settings()


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None,
            timeout: float = 600, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `invoke ARGS` from the repo (as a user would) and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout, input=input)


@pytest.fixture
def cli():
    """Call as cli("fetch", "--recipe", "x"); uses the current os.environ (monkeypatched)."""
    return run_cli


# --- the qemu binaries tests use: explicit, never PATH's first hit (see support/qemu012.py) ---

@pytest.fixture(scope="session")
def distro_qemu() -> Path:
    """Debian's qemu-system-x86_64 (dpkg says which file), whatever /usr/local/bin holds."""
    from kvmlab.qemu.binary import distro_qemu as find
    q = find()
    if q is None:
        pytest.skip("qemu-system-x86 is not installed (apt-get install qemu-system-x86; "
                    ".ci/setup does)")
    return q


@pytest.fixture(scope="session")
def distro_qemu_img() -> Path:
    """Debian's qemu-img (package qemu-utils)."""
    from kvmlab.qemu.binary import distro_qemu_img as find
    q = find()
    if q is None:
        pytest.skip("qemu-utils is not installed (apt-get install qemu-utils; .ci/setup does)")
    return q


@pytest.fixture(scope="session")
def qemu_012(tmp_path_factory):
    """A qemu-kvm 0.12 build (support.qemu012.Qemu012): $KVMLAB_TEST_QEMU_012, else built by
    kvmlab from the release tarball in a temporary state dir. Skips only when there is neither
    such a tarball nor a docker daemon to build it in; a failing build fails the test."""
    from support import qemu012
    found = qemu012.from_env()
    if found:
        return found
    why = qemu012.unavailable_reason()
    if why:
        pytest.skip(why)
    return qemu012.build(qemu012.find_tarball(), tmp_path_factory.mktemp("qemu012"))


@pytest.fixture(scope="session")
def qemu_012_debug(tmp_path_factory):
    """The qemu-kvm 0.12 debug flavour (invoke build --flavour debug: -O0 -g, unstripped),
    built by kvmlab from the release tarball in a temporary state dir."""
    from support import qemu012
    why = qemu012.unavailable_reason() if not qemu012.find_tarball() else None
    if why or qemu012.find_tarball() is None:
        pytest.skip(why or "no qemu-kvm 0.12 tarball")
    from support.build import docker_available
    why = docker_available()
    if why:
        pytest.skip(f"cannot build the qemu-kvm 0.12 debug flavour: {why}")
    return qemu012.build(qemu012.find_tarball(), tmp_path_factory.mktemp("qemu012dbg"), "debug")
