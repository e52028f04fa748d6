"""Every task, every flag, each class of bad value: one clear error, nothing left behind.

The table below names, for each kind of flag, the bad values a user types (not a number, a
fraction where a whole number is wanted, out of range, an unknown choice, a missing path, a
directory where a file is wanted, a file that is not what the flag wants, ...). The test
enumerates the real task collection, so a new task or flag without an entry here fails
``test_every_flag_has_bad_values``. Each case runs the real `invoke` program and asserts: non-zero
exit, no traceback, the last two lines are one ``error:`` and one ``hint:``, the message names the
flag or the value, and nothing but logs appeared under the state dir.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvmlab.tasks import ns
from kvmlab.tasks._flags import flag_type

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# Placeholders, made real by the `paths` fixture
MISSING, DIR, EMPTY, TEXT, NOEXEC, RO_NEW, NOPARENT = (
    "@missing", "@dir", "@empty", "@text", "@noexec", "@ro/new", "@noparent/new")
# an inventory Ansible cannot read, and a good one ([db] h1, [web] h2) for a group it lacks
BADINV, INV = "@badinv", "@inv"

BY_TYPE: dict[str, list[str]] = {
    "INT": ["abc", "0.5", "-5", "0", "1e3"],
    "SECONDS": ["abc", "-1", "nan", "inf", "1,5"],
    "CHOICE": ["nope", ""],
    "LIST": ["nope", "tiny,nope"],
    "FILE": [MISSING, DIR],
    "DIR": [MISSING, TEXT],
    "PATH": [MISSING, EMPTY, DIR, TEXT],
    "PROGRAM": [MISSING, DIR, NOEXEC, "no-such-command-kvmlab"],
    "FILES": [MISSING, TEXT + "," + MISSING],
    "DIRS": [MISSING, TEXT],
    "ROOT": [TEXT, TEXT + "/sub"],
    "SIZE": ["abc", "0", "-1G", "10X"],
    "CPU": ["", "max;reboot", "-svm", "max,,svm"],
    "INVENTORY": [MISSING, BADINV, INV + ":nope", EMPTY],
    "HOSTS": [MISSING, BADINV, INV + ":nope", "local://," + INV + ":nope", ""],
}
# Values a flag's own meaning refuses beyond its type (a text file is not a kernel, ...)
BY_FLAG: dict[str, list[str]] = {
    "recipe": ["nope", "/nonexistent/r.toml", TEXT],
    "builder": ["nope"],
    "kernel": [EMPTY, TEXT],
    "iso": [TEXT],
    "ko": [TEXT],
    "qemu": ["/bin/true"],
    "qemu_img": ["/bin/true"],
    "prefix": ["relative/dir", TEXT],
    "destdir": [TEXT],
    "path": [DIR, RO_NEW, NOPARENT],
    "output": [DIR, RO_NEW, NOPARENT],
    "code": ["nope", "0xffffffff", "99", "KVM_EXIT_NOPE", "0x40000030"],
    "step": ["nope"],
    "hosts": ["ftp://host", "nope"],
    "skip": ["nope"],
    "qemu_recipe": ["nope", TEXT],
}
BY_TASK_FLAG: dict[tuple[str, str], list[str]] = {
    ("lab", "hosts"): [MISSING, DIR, TEXT],
    ("install-bios", "timeout"): ["0"],
    ("doctor", "timeout"): ["0"],
    ("trace-kvm", "timeout"): ["0"],
}
# What a flag needs besides itself for the task to get as far as the flag
BASE_ARGS = {"create-image": ["--path", "@tmp/ok.qcow2"], "explain-exit": ["--code", "0x30"]}
NO_BAD_VALUE = {"debug"}  # booleans take no value; --debug is tested below


def _flags(task_name: str) -> list:
    return [a for a in ns[task_name].get_arguments() if a.kind is not bool and a.name not in NO_BAD_VALUE]


def _bad_values(task_name: str, arg) -> list[str]:
    name = arg.attr_name or arg.name
    values: list[str] = []
    ft = flag_type(task_name, name)
    if ft is not None:
        values += BY_TYPE[ft.metavar]
    values += BY_FLAG.get(name, []) + BY_TASK_FLAG.get((task_name, name), [])
    return list(dict.fromkeys(values))


def _cases() -> list:
    out = []
    for t in sorted(ns.task_names):
        for arg in _flags(t):
            for v in _bad_values(t, arg):
                flag = arg.names[0]  # the dashed form users type (--qemu-img)
                out.append(pytest.param(t, flag, v, id=f"{t}--{flag}={v or 'EMPTY'}"))
    return out


def test_every_flag_has_bad_values():
    missing = [f"{t} --{a.names[0]}" for t in sorted(ns.task_names) for a in _flags(t)
               if not _bad_values(t, a)]
    assert not missing, f"no bad values in the table for: {missing}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Recipes whose URLs point at a closed loopback port (nothing leaves the machine), and the
    files the placeholders stand for; a read-only directory when the kernel lets us mount one."""
    root = tmp_path_factory.mktemp("badinput")
    recipes = root / "recipes"
    recipes.mkdir()
    for f in (REPO / "recipes").glob("*.toml"):
        text = re.sub(r'"https?://[^"]+"', '"http://127.0.0.1:9/closed"', f.read_text())
        (recipes / f.name).write_text(text)
    (root / "a-dir").mkdir()
    (root / "empty").write_bytes(b"")
    (root / "text.txt").write_text("this is not what the flag wants\n")
    (root / "noexec").write_text("#!/bin/sh\n")
    (root / "bad.ini").write_text("[db\nfoo\n")
    (root / "inv.ini").write_text("[db]\nh1\n[web]\nh2\n")
    os.chmod(root / "noexec", 0o644)
    ro = root / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                             capture_output=True).returncode == 0
    yield {"root": root, "recipes": recipes, "ro": ro if mounted else None}
    if mounted:
        subprocess.run(["umount", str(ro)], capture_output=True)


def _real(value: str, w: dict, tmp: Path) -> str:
    root = w["root"]
    table = {MISSING: str(root / "no" / "such-file"), DIR: str(root / "a-dir"),
             EMPTY: str(root / "empty"), TEXT: str(root / "text.txt"), NOEXEC: str(root / "noexec"),
             BADINV: str(root / "bad.ini"), INV: str(root / "inv.ini"),
             NOPARENT: str(root / "no" / "such" / "x.qcow2")}
    if value == RO_NEW:
        if w["ro"] is None:
            pytest.skip("cannot mount a read-only tmpfs here (needs root)")
        return str(w["ro"] / "x.qcow2")
    def one(part: str) -> str:
        for key in sorted(table, key=len, reverse=True):
            if part.startswith(key):
                return table[key] + part[len(key):]
        return part.replace("@tmp", str(tmp))
    return ",".join(one(p) for p in value.split(",")) if value else value


def _env(w: dict, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMLAB_")}
    env.update(KVMLAB_HOME=str(REPO), KVMLAB_STATE_DIR=str(state),
               KVMLAB_CACHE=str(state.parent / "cache"), KVMLAB_LOCK=str(state / "kvmlab.lock"),
               KVMLAB_RECIPES_DIR=str(w["recipes"]), NO_COLOR="1", COLUMNS="200")
    return env


def _snapshot(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _assert_clear(r: subprocess.CompletedProcess, mention: list[str]) -> None:
    both = r.stdout + r.stderr
    assert r.returncode != 0, f"exit 0 on bad input:\n{both[-1500:]}"
    assert "Traceback" not in both, both[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) >= 2 and lines[-2].startswith("error: ") and lines[-1].startswith("hint: "), \
        f"last lines are not one error and one hint:\n{r.stderr[-1500:]}"
    text = "\n".join(lines[-2:])
    assert any(m and m in text for m in mention), f"the error names none of {mention}:\n{text}"


@pytest.mark.parametrize("task_name, flag, value", _cases())
def test_bad_flag_value_is_one_clear_error(world, tmp_path, task_name, flag, value):
    state = tmp_path / "state"
    state.mkdir()
    env = _env(world, state)
    real = _real(value, world, tmp_path)
    base = BASE_ARGS.get(task_name, [])
    args = [task_name]
    for i in range(0, len(base), 2):
        if base[i] != f"--{flag}":
            args += [base[i], _real(base[i + 1], world, tmp_path)]
    before = _snapshot(state)
    r = _run([*args, f"--{flag}", real], env, tmp_path)
    mention = [f"--{flag}", real, os.path.basename(real.rstrip("/")), repr(real)]
    _assert_clear(r, mention)
    new = {p for p in _snapshot(state) - before if not p.endswith(".log")}
    assert not new, f"bad input left {sorted(new)} under the state dir"


# --------------------------------------------------------------------------------------------
# Settings and invoke's own flags
# --------------------------------------------------------------------------------------------

def _source_tarball(tmp: Path) -> Path:
    from support.fakeqemu import make_fake_qemu_tarball
    return make_fake_qemu_tarball(tmp, name="qemu-kvm-0.12.1.2")


@pytest.mark.parametrize("setting", ["KVMLAB_STATE_DIR", "KVMLAB_CACHE", "KVMLAB_LOCK"])
@pytest.mark.parametrize("what", ["read-only", "a file", "a directory"])
def test_unusable_state_cache_lock_paths(world, tmp_path, setting, what):
    if what == "read-only" and world["ro"] is None:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    if what == "a directory" and setting != "KVMLAB_LOCK":
        pytest.skip("a directory is what the other two want")
    state = tmp_path / "state"
    state.mkdir()
    env = _env(world, state)
    bad = {"read-only": str(world["ro"] / "sub") if world["ro"] else "",
           "a file": str(world["root"] / "text.txt"), "a directory": str(world["root"] / "a-dir")}
    env[setting] = bad[what]
    src = _source_tarball(tmp_path)
    r = _run(["fetch", "--source", str(src), "--no-verify"], env, tmp_path)
    _assert_clear(r, [setting, bad[what]])


def test_debug_after_the_task_name_shows_the_traceback(world, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    env = _env(world, state)
    r = _run(["fetch", "--recipe", "nope", "--debug"], env, tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "RecipeError" in r.stderr
    r = _run(["fetch", "--recipe", "nope"], env, tmp_path)
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("content, suffix", [("kvmlab:\n  recipe: [unclosed\n", ".yaml"),
                                             ("{", ".json"), ("x", ".txt"), (None, ".yaml")])
def test_malformed_or_missing_config_file(world, tmp_path, content, suffix):
    state = tmp_path / "state"
    state.mkdir()
    cfg = tmp_path / f"kvmlab{suffix}"
    if content is not None:
        cfg.write_text(content)
    r = _run(["-f", str(cfg), "recipes"], _env(world, state), tmp_path)
    _assert_clear(r, [str(cfg)])
