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
    from kvmlab.config import load_settings
    state = tmp_path / "state"
    cache = tmp_path / "cache"
    state.mkdir()
    monkeypatch.setenv("KVMLAB_HOME", str(REPO))
    monkeypatch.setenv("KVMLAB_STATE_DIR", str(state))
    monkeypatch.setenv("KVMLAB_CACHE", str(cache))
    monkeypatch.setenv("KVMLAB_LOCK", str(state / "kvmlab.lock"))
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
