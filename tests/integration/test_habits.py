"""What lab engineers expect of a CLI (issue 16, items 1-3): `status`, `--json` with JSON errors
and honest exit codes, honest dry runs, plain output when piped, --no-color / NO_COLOR, and the
`kvmlab` program reading ./kvmlab.yaml. Every case runs the real program and parses its output.
"""
from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.clienv import isolated_env
from support.fakeqemu import make_fake_qemu_tarball

REPO = Path(__file__).resolve().parents[2]
RECIPE = "qemu-kvm-0.12.1.2"


_env = isolated_env


def _invoke(env: dict[str, str], *args: str, cwd: Path = REPO,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _kvmlab(env: dict[str, str], *args: str, cwd: Path,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The `kvmlab` program (python3 -m kvmlab is the console command's module)."""
    return subprocess.run([sys.executable, "-m", "kvmlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _tree(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


# --------------------------------------------------------------------------------------------
# 1. status
# --------------------------------------------------------------------------------------------

def test_status_shows_sources_records_and_next_steps(tmp_path):
    env = _env(tmp_path)
    env.pop("KVMLAB_CACHE")
    tarball = make_fake_qemu_tarball(tmp_path / "src", name=RECIPE)
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "kvmlab.yaml").write_text(f"kvmlab:\n  cache: {tmp_path / 'cfgcache'}\n"
                                      "  builder: centos6\n")
    f = _kvmlab(env, "fetch", "--source", str(tarball), "--no-verify", "--json", cwd=work)
    assert f.returncode == 0, f.stdout + f.stderr
    fetched = json.loads(f.stdout)
    assert fetched["status"] == "local" and fetched["path"].startswith(str(tmp_path / "cfgcache"))
    # records status reads: a build manifest, a last boot-test
    out = tmp_path / "state" / "out" / RECIPE / "centos6"
    out.mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"artifacts": [{"path": "bin/x"}]}))
    (tmp_path / "state" / "vm").mkdir()
    (tmp_path / "state" / "vm" / "last-boot.json").write_text(json.dumps(
        [{"guest": "tiny", "booted": True, "accel": "tcg", "seconds": 0.5}]))
    before = _tree(tmp_path / "state")

    r = _kvmlab(env, "status", "--recipe", RECIPE, "--json", cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    st = json.loads(r.stdout)
    src = {row["name"]: row["source"] for row in st["settings"]}
    assert src["recipe"] == "flag" and src["builder"] == "config" and src["cache"] == "config"
    assert src["state_dir"] == "env" and src["home"] == "env" and src["recipes_dir"] == "default"
    value = {row["name"]: row["value"] for row in st["settings"]}
    assert value["builder"] == "centos6" and value["cache"] == str(tmp_path / "cfgcache")
    assert {x["name"] for x in st["recipes"]} >= {RECIPE} and all(x["valid"] for x in st["recipes"])
    assert [e["name"] for e in st["lock"]] == [f"{RECIPE}/{RECIPE}.tar.gz"]
    assert st["lock"][0]["detail"] == fetched["sha256"]
    assert [e["path"] for e in st["fetched"]] == [fetched["path"]]
    assert [e["path"] for e in st["built"]] == [str(out / "manifest.json")]
    assert st["installed"] == [] and st["doctor"] is None
    assert st["last_boot"]["runs"][0]["guest"] == "tiny"
    nxt = {n["step"]: n["next"] for n in st["next"]}
    assert nxt["fetch"] == "recorded" and nxt["build"] == "recorded"
    assert nxt["install"] == "runs" and nxt["doctor"] == "runs"
    assert _tree(tmp_path / "state") == before, "status wrote something"

    # invoke from the repo does not read that kvmlab.yaml: the builder is the default there
    i = _invoke(env, "status", "--json")
    assert {x["name"]: x["source"] for x in json.loads(i.stdout)["settings"]}["builder"] == \
        "default"


def test_status_piped_is_plain_lines(tmp_path):
    env = _env(tmp_path, COLUMNS="40")
    r = _invoke(env, "status")
    assert r.returncode == 0, r.stderr
    assert not any(ch in r.stdout for ch in "│┃━─┏┗"), r.stdout[:500]
    assert "\x1b[" not in r.stdout
    lines = r.stdout.splitlines()
    # one row, one line, however narrow the "terminal": the state dir's row holds the whole path
    row = next(ln for ln in lines if ln.startswith("state_dir "))
    assert row.split() == ["state_dir", str(tmp_path / "state"), "env"]
    assert any(ln.split()[:2] == ["fetch", "runs"] for ln in lines)


def test_invalid_recipe_fails_recipes_and_status(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / f"{RECIPE}.toml").write_text((REPO / "recipes" / f"{RECIPE}.toml").read_text())
    (recipes / "broken.toml").write_text("name = [unclosed\n")
    env = _env(tmp_path, KVMLAB_RECIPES_DIR=str(recipes), KVMLAB_RECIPE=RECIPE)
    r = _invoke(env, "recipes")
    assert r.returncode == 1 and "broken.toml" in r.stderr.splitlines()[-2], r.stderr
    j = _invoke(env, "recipes", "--json")
    assert j.returncode == 1
    doc = json.loads(j.stdout)
    assert "broken.toml" in doc["error"] and doc["hint"]
    assert sorted(x["valid"] for x in doc["recipes"]) == [False, True]
    s = _invoke(env, "status", "--json")
    assert s.returncode == 1 and "invalid recipe" in json.loads(s.stdout)["error"]
    ok = _invoke({**env, "KVMLAB_RECIPES_DIR": str(REPO / "recipes")}, "recipes", "--json")
    assert ok.returncode == 0 and all(x["valid"] for x in json.loads(ok.stdout)["recipes"])


# --------------------------------------------------------------------------------------------
# 2. --json: one document on stdout, errors too, honest exit codes
# --------------------------------------------------------------------------------------------

FAILING = {  # a task under conditions that fail inside it (after flag parsing)
    "fetch": ["fetch", "--offline", "--no-verify"],
    "build": ["build", "--builder", "native", "--offline", "--no-verify"],
    "install": ["install", "--no-verify"],
    "install-bios": ["install-bios", "--no-verify"],
    "lab": ["lab", "--resume"],
    "lab --check": ["lab", "--check"],
    "boot-test": ["boot-test", "--dry-run", "--guest", "tiny", "--accel", "tcg"],  # not cached
    "create-image": ["create-image", "--path", str(REPO / "README.md")],   # never overwritten
    "report": ["report"],                                                  # no lab recorded
}


@pytest.mark.parametrize("name", sorted(FAILING))
def test_json_errors_are_one_document(tmp_path, name):
    env = _env(tmp_path)
    args = FAILING[name]
    text = _invoke(env, *args)
    r = _invoke(env, *args, "--json")
    assert text.returncode != 0 and r.returncode == text.returncode, r.stdout + r.stderr
    doc = json.loads(r.stdout)                       # the whole of stdout is one document
    assert doc["error"] and "hint" in doc
    assert "Traceback" not in r.stderr
    plain = [ln for ln in text.stderr.splitlines() if ln.startswith("error: ")]
    assert plain and plain[-1] == "error: " + doc["error"]


def test_json_bad_flag_value_is_a_document_too(tmp_path):
    env = _env(tmp_path)
    r = _invoke(env, "fetch", "--timeout", "abc", "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    assert doc["error"].startswith("--timeout: ") and doc["hint"]
    assert r.stderr.splitlines()[-2] == "error: " + doc["error"]


def test_json_success_documents(tmp_path):
    env = _env(tmp_path)
    tarball = make_fake_qemu_tarball(tmp_path / "src", name=RECIPE)
    f = _invoke(env, "fetch", "--source", str(tarball), "--json")   # its checks run too
    assert f.returncode == 0, f.stderr
    d = json.loads(f.stdout)
    assert d["file"] == f"{RECIPE}.tar.gz" and len(d["sha256"]) == 64
    assert "verified" in f.stderr                                   # human lines on stderr
    v = _invoke(env, "verify", "--step", "fetch", "--json")
    assert v.returncode == 0, v.stderr
    rep = json.loads(v.stdout)
    assert rep["ok"] and {r["status"] for r in rep["results"]} <= {"passed", "skipped"}
    e = _invoke(env, "explain-exit", "0x80000022", "--json")
    assert e.returncode == 0 and json.loads(e.stdout)["code"] == 0x80000022


# --------------------------------------------------------------------------------------------
# 3. honest dry runs, colour
# --------------------------------------------------------------------------------------------

def test_invoke_dry_refuses_a_task_without_dry_run(tmp_path):
    env = _env(tmp_path)
    img = tmp_path / "img" / "disk.qcow2"
    img.parent.mkdir()
    r = _invoke(env, "--dry", "create-image", "--path", str(img), "--size", "1M")
    assert r.returncode == 1 and not img.exists()
    assert r.stderr.splitlines()[-2].startswith("error: --dry: `create-image` has no dry run")
    j = _invoke(env, "--dry", "create-image", "--path", str(img), "--json")
    assert j.returncode == 1 and "no dry run" in json.loads(j.stdout)["error"]


def _read_until(p: subprocess.Popen, needle: bytes, limit: float) -> bytes:
    """qemu's stdout until ``needle`` shows (or the limit passes: a bound, not an assertion)."""
    assert p.stdout is not None
    got = b""
    end = time.monotonic() + limit
    while needle not in got and time.monotonic() < end and p.poll() is None:
        ready, _, _ = select.select([p.stdout], [], [], 1.0)
        if ready:
            got += os.read(p.stdout.fileno(), 4096)
    return got


def test_boot_test_dry_run_writes_nothing_and_its_command_boots(tmp_path, distro_qemu):
    env = _env(tmp_path)
    g = _invoke(env, "guest", "--kind", "tiny")
    assert g.returncode == 0, g.stderr
    before = _tree(tmp_path / "state") | {"cache/" + x for x in _tree(tmp_path / "cache")}
    for how in (["boot-test", "--dry-run"], ["--dry", "boot-test"]):
        r = _invoke(env, *how, "--qemu", str(distro_qemu), "--accel", "tcg", "--guest", "tiny")
        assert r.returncode == 0, r.stderr
        argv = shlex.split(r.stdout.strip().splitlines()[-1])
        assert argv[0] == str(distro_qemu) and "-S" not in argv and "-no-reboot" in argv
        assert not any(a.startswith(("unix:", "file:")) or a == "-pidfile" for a in argv)
        files = [opt.split("file=", 1)[1].split(",")[0] for opt in argv if "file=" in opt]
        assert files and all(Path(x).is_file() for x in files)
        after = _tree(tmp_path / "state") | {"cache/" + x for x in _tree(tmp_path / "cache")}
        assert {x for x in after - before if "qemu-probe" not in x} == set()
    # pasted as is, it boots the tiny guest: its marker shows on the terminal
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        out = _read_until(p, b"KVMLAB-BOOT-OK", 60)
    finally:
        p.kill()
        p.wait(timeout=30)
    assert b"KVMLAB-BOOT-OK" in out, out[-500:]
    j = _invoke(env, "boot-test", "--dry-run", "--json", "--qemu", str(distro_qemu),
                "--accel", "tcg", "--guest", "tiny")
    assert j.returncode == 0 and json.loads(j.stdout)["commands"][0]["argv"] == argv


def test_boot_test_dry_run_without_cached_guest_says_so(tmp_path, distro_qemu):
    env = _env(tmp_path)
    r = _invoke(env, "boot-test", "--dry-run", "--qemu", str(distro_qemu), "--accel", "tcg",
                "--guest", "tiny")
    assert r.returncode == 1 and "invoke guest --kind tiny" in r.stderr
    assert not (tmp_path / "cache" / "guests").exists()
    assert not (tmp_path / "state" / "vm").exists()


@pytest.mark.parametrize("how", ["--no-color", "NO_COLOR"])
def test_no_color(tmp_path, how):
    env = _env(tmp_path, FORCE_COLOR="1")          # rich would colour a pipe when forced
    coloured = _invoke(env, "recipes")
    assert "\x1b[" in coloured.stdout
    r = _invoke({**env, "NO_COLOR": "1"}, "recipes") if how == "NO_COLOR" else \
        _invoke(env, "recipes", "--no-color")
    assert r.returncode == 0 and "\x1b[" not in r.stdout + r.stderr and RECIPE in r.stdout
