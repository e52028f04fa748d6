"""The set-up leaves the system Python alone, and README's two commands reach what it made.

`.ci/setup` is run for real on a copy of the checkout (git's files only): it creates `.venv`,
installs kvmlab with its extras there from the package index, and a second run is a no-op. The
system Python's installed distributions and Debian's EXTERNALLY-MANAGED marker are compared before
and after. README's commands are read from README.md and must be the ones `.ci/run` runs.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PY = "/usr/bin/python3"


def readme_commands() -> list[str]:
    """The indented command lines of README's "On a fresh machine" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [m.group(1).strip() for m in re.finditer(r"^    (\S.*)$", section, re.M)][:2]


def test_readme_commands_are_what_ci_runs():
    setup_and_lab, tests = readme_commands()
    assert setup_and_lab == "bash .ci/setup && .venv/bin/invoke lab"
    run = (REPO / ".ci/run").read_text()
    assert "bash .ci/setup" in run and "INVOKE=.venv/bin/invoke" in run
    assert '"$INVOKE" lab --source' in run
    assert re.search(rf"^{re.escape(tests)}$", run, re.M), f"{tests!r} is not a line of .ci/run"


def test_setup_never_breaks_system_packages():
    for f in (".ci/setup", ".ci/run"):
        text = (REPO / f).read_text()
        assert "break-system-packages" not in text, f
        assert "python3 -m pip" not in text, f"{f} runs the system Python's pip"


def _system_dists() -> list[str]:
    """Every distribution the system Python sees (isolated: no env, no user site)."""
    code = ("import importlib.metadata as m, json; print(json.dumps(sorted("
            "f'{d.metadata[\"Name\"]}=={d.version}@{d._path}' for d in m.distributions())))")
    r = subprocess.run([SYSTEM_PY, "-I", "-c", code], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _copy_checkout(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                           timeout=60).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("KVMLAB_", "PYTHON", "VIRTUAL_ENV", "PYTEST"))}


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason=".ci/setup installs system packages (root)")
@pytest.mark.skipif(not Path(SYSTEM_PY).exists(), reason="no Debian system python3")
def test_setup_makes_a_venv_and_leaves_the_system_python(tmp_path):
    if subprocess.run(["docker", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("dockerd is not running (a first .ci/setup starts it)")
    root = tmp_path / "checkout"
    _copy_checkout(root)
    marker = Path("/usr/lib/python3.11/EXTERNALLY-MANAGED")
    had_marker = marker.exists()
    before = _system_dists()
    t0 = time.monotonic()
    r = subprocess.run(["bash", ".ci/setup"], cwd=root, env=_clean_env(), capture_output=True,
                       text=True, timeout=1200)
    first = time.monotonic() - t0
    if r.returncode != 0 and "No matching distribution" in r.stdout + r.stderr:
        pytest.skip("the package index is not reachable")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert _system_dists() == before, "the set-up changed the system Python's packages"
    assert marker.exists() == had_marker
    py = root / ".venv/bin/python"
    where = subprocess.run([py, "-c", "import kvmlab, fabric, pytest, ruff; print(kvmlab.__file__)"],
                           capture_output=True, text=True, timeout=60, env=_clean_env(), cwd="/")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip() == str(root / "src/kvmlab/__init__.py")   # editable: this copy
    env = {**_clean_env(), "KVMLAB_STATE_DIR": str(tmp_path / "state"), "NO_COLOR": "1"}
    lst = subprocess.run([root / ".venv/bin/invoke", "--list"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert lst.returncode == 0 and re.search(r"^\s+lab\b", lst.stdout, re.M), lst.stdout
    st = subprocess.run([root / ".venv/bin/kvmlab", "status", "--json"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    assert "settings" in json.loads(st.stdout)
    t0 = time.monotonic()
    again = subprocess.run(["bash", ".ci/setup"], cwd=root, env=_clean_env(), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "installing kvmlab" not in again.stdout   # pyproject unchanged: nothing reinstalled
    print(f"setup: first run {first:.1f} s, second {time.monotonic() - t0:.1f} s")
