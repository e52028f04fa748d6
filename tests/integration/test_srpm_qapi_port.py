"""The Python 2 -> 3 port of the RHEL 6 tree's QAPI generators (patches/qemu-kvm-0.12.1.2-el6/
0001-qapi-scripts-python3.patch): on a schema written here, the patched generators run by
Python 3 produce byte-for-byte what the UNPATCHED generators produce under Python 2.

Why this needs KVMLAB_EL6_TREE: the generators are qemu-kvm's own code (scripts/qapi*.py), which
never enters this repository, and the patch holds only the changed lines, so there is nothing to
run without a RHEL 6 tree. Set KVMLAB_EL6_TREE to an unpatched tree (e.g. the unpacked source RPM,
or `git archive` of a qemu-kvm-0.12.1.2-2.*.el6* tag); CI, which has neither the tree nor Python 2,
skips this test. The reference below was produced once with Python 2.7.18 and the unpatched
scripts (the commands in EXPECTED's comment) and is kept as sha256 digests, so no generated
third-party output is stored here; the same comparison over the tree's four real schemas (24
files) is documented in the patch header.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATCH = REPO / "patches/qemu-kvm-0.12.1.2-el6/0001-qapi-scripts-python3.patch"

SCHEMA = """\
# a small QAPI schema exercising every generator path
{ 'enum': 'DemoColor', 'data': [ 'red', 'dark-green', 'unix' ] }

{ 'type': 'DemoPoint', 'data': { 'x': 'int', 'y': 'int', '*label': 'str' } }

{ 'type': 'DemoShape',
  'data': { 'name': 'str', 'color': 'DemoColor', 'points': ['DemoPoint'],
            '*extra': { 'scale': 'number', '*visible': 'bool' } } }

{ 'union': 'DemoValue', 'data': { 'point': 'DemoPoint', 'shape': 'DemoShape' } }

{ 'command': 'demo-draw', 'data': { 'shape': 'DemoShape', '*repeat': 'uint32' },
  'returns': 'DemoPoint' }

{ 'command': 'demo-list', 'returns': ['DemoShape'] }

{ 'command': 'demo-reset' }

{ 'command': 'demo-custom', 'data': { 'arg': 'str' }, 'gen': 'no' }
"""

# Python 2.7.18, unpatched scripts of qemu-kvm-0.12.1.2-2.491.el6_8.1, in OUT:
#   python2 scripts/qapi-types.py -h|-c -o OUT -p demo- < demo.json
#   python2 scripts/qapi-visit.py -h|-c -o OUT -p demo- < demo.json
#   python2 scripts/qapi-commands.py -h|-c [-m] -o OUT[/m] -p demo- < demo.json
# What the files hold, for a reader: demo-qapi-types.h declares `typedef enum DemoColor` with
# DEMO_COLOR_RED = 0, DEMO_COLOR_DARK_GREEN = 1, DEMO_COLOR_UNIX = 2, DEMO_COLOR_MAX = 3 and
# `struct DemoShape` with `bool has_extra;` before an anonymous struct `extra`; demo-qmp-
# commands.h declares `DemoPoint * qmp_demo_draw(DemoShape * shape, bool has_repeat, uint32_t
# repeat, Error **errp);` and no qmp_demo_custom marshaller ('gen': 'no').
EXPECTED = {
    "demo-qapi-types.c": "7063e407edcc02156f61b38ed8d9c08f1971b9248173c9a20293df78c87fb5a5",
    "demo-qapi-types.h": "db525e51abb69e03792236386fd511a8749f190e687eaf583d268d70256d2300",
    "demo-qapi-visit.c": "9ea35f067627786a7bae94108bd17080ebff03578c1760229aedb3c2d4dea657",
    "demo-qapi-visit.h": "536e52030478031898c2ebe96451521cb1c130e130d134b7d866143bbbcced7b",
    "demo-qmp-commands.h": "99f55679d11dde4536c4274746da3b20b351a4b73f90f02a33c039e491b011a7",
    "demo-qmp-marshal.c": "f955b77f8f764e3c2fb5ea97fec5d5d588816a025bf262a375e385b1debb98f6",
    "m/demo-qmp-commands.h": "6a34de808a0c5c0ad32f02468cb6a62a7d1bc8d982ae9b0e4e14ae935a5fcf8f",
    "m/demo-qmp-marshal.c": "9b9ce8b049ed456735884b0a17d9dbb93f7ae000effcf00324f36fb9b3c27e92",
}


@pytest.fixture
def scripts(tmp_path):
    tree = os.environ.get("KVMLAB_EL6_TREE")
    if not tree:
        pytest.skip("KVMLAB_EL6_TREE is not set: the QAPI generators are qemu-kvm's code and only "
                    "exist in a RHEL 6 tree (see this module's docstring)")
    src = Path(tree) / "scripts"
    if not (src / "qapi-types.py").is_file():
        pytest.fail(f"KVMLAB_EL6_TREE={tree} has no scripts/qapi-types.py")
    if "print(" in (src / "qapi-types.py").read_text():
        pytest.fail(f"KVMLAB_EL6_TREE={tree} is already patched; give an unpatched tree")
    root = tmp_path / "tree"
    shutil.copytree(src, root / "scripts")
    return root


def _run(py: str, root: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    schema = root / "demo.json"
    schema.write_text(SCHEMA)
    runs = [(f"qapi-{s}.py", k, []) for s in ("types", "visit") for k in ("-h", "-c")]
    runs += [("qapi-commands.py", k, m) for m in ([], ["-m"]) for k in ("-h", "-c")]
    for script, kind, extra in runs:
        dest = out / "m" if extra else out
        with open(schema) as stdin:
            proc = subprocess.run([py, str(root / "scripts" / script), kind, *extra, "-o",
                                   str(dest), "-p", "demo-"], stdin=stdin, capture_output=True,
                                  text=True, timeout=60, env=env)
        if proc.returncode != 0:
            return proc
    return proc


def test_unpatched_generators_fail_under_python3(scripts, tmp_path):
    proc = _run(sys.executable, scripts, tmp_path / "out")
    assert proc.returncode != 0 and "SyntaxError" in proc.stderr


def test_ported_generators_match_python2_output(scripts, tmp_path):
    patch = subprocess.run(["patch", "-p1", "-F0", "--batch", "-i", str(PATCH)], cwd=scripts,
                           capture_output=True, text=True, timeout=60)
    assert patch.returncode == 0, patch.stdout + patch.stderr
    out = tmp_path / "out"
    for env_extra in ({}, {"LC_ALL": "C"}):  # output must not depend on the locale either
        shutil.rmtree(out, ignore_errors=True)
        proc = _run(sys.executable, scripts, out, env=dict(os.environ, **env_extra))
        assert proc.returncode == 0, proc.stderr
        got = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(out.rglob("*")) if p.is_file()}
        assert got == EXPECTED
