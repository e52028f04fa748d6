"""Issue 16 items 1-3, the rest: `--json` on images, guest, clean, uninstall and repro-check
(success and failure, one document on stdout), a bad `-f FILE` under --json (invoke and the
`kvmlab` program), a standalone doctor / boot-test seen by `status`, and the step checks counting
skipped checks apart from passed ones. Every case runs the real program and parses its stdout.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from support.build import docker_available, fake_home
from support.clienv import isolated_env
from support.fakeqemu import write_fake_qemu_tree
from support.install import make_fake_build, make_home

REPO = Path(__file__).resolve().parents[2]


_env = isolated_env


def _run(env: dict[str, str], *args: str, program: str = "invoke", cwd: Path = REPO,
         timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", program, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _doc(r: subprocess.CompletedProcess, ok: bool) -> dict:
    """The one JSON document of a --json run (the whole of stdout), and an honest exit code."""
    assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert "Traceback" not in r.stderr
    if not ok:
        assert doc["error"] and "hint" in doc, doc
    else:
        assert "error" not in doc, doc
    return doc


# --------------------------------------------------------------------------------------------
# --json on the tasks that lacked it
# --------------------------------------------------------------------------------------------

def test_guest_json(tmp_path):
    env = _env(tmp_path)
    doc = _doc(_run(env, "guest", "--kind", "tiny", "--json"), ok=True)
    (g,) = doc["guests"]
    assert g["kind"] == "tiny" and g["status"] == "built" and g["dir"].startswith(str(tmp_path))
    assert g["files"] and g["size"] == sum(f["size"] for f in g["files"])
    for f in g["files"]:
        data = Path(f["path"]).read_bytes()
        assert len(data) == f["size"]
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
    again = _doc(_run(env, "guest", "--kind", "tiny", "--json", "--listing"), ok=True)
    assert again["guests"][0]["status"] == "cached" and "jmp" in again["listing"].lower()
    # the cache is a file: the task fails, as one document
    bad = _env(tmp_path, KVMLAB_CACHE=str(REPO / "README.md"))
    doc = _doc(_run(bad, "guest", "--kind", "tiny", "--json"), ok=False)
    assert "README.md" in doc["error"]


@pytest.fixture
def fake_build(tmp_path):
    """A KVMLAB_HOME for the fake qemu tree with a native build in out/fake-qemu/native."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this host (the fake tree is built natively)")
    from kvmlab.core.settings import load_settings
    from kvmlab.model.recipe import load_recipe
    home = make_home(tmp_path / "home")
    env = _env(tmp_path, KVMLAB_HOME=str(home), KVMLAB_RECIPE="fake-qemu",
               KVMLAB_BUILDER="native")
    s = load_settings({"home": str(home), "state_dir": env["KVMLAB_STATE_DIR"],
                       "cache": env["KVMLAB_CACHE"], "lock": env["KVMLAB_LOCK"]})
    out = make_fake_build(s, load_recipe(s.recipes_dir, "fake-qemu"), "native", tmp_path / "w")
    return env, out


def test_uninstall_and_clean_json(tmp_path, fake_build):
    env, out = fake_build
    dest = tmp_path / "dest"
    old = dest / "usr/local/bin/qemu-img"
    old.parent.mkdir(parents=True)
    old.write_text("#!/bin/sh\necho old qemu-img\n")
    missing = _doc(_run(env, "uninstall", "--destdir", str(dest), "--json"), ok=False)
    assert "nothing installed by kvmlab" in missing["error"]

    inst = _run(env, "install", "--destdir", str(dest), "--no-verify", "--json")
    installed = _doc(inst, ok=True)
    assert installed["verify"] is None                       # --no-verify: no checks ran
    doc = _doc(_run(env, "uninstall", "--destdir", str(dest), "--json"), ok=True)
    assert doc["restored"] == [str(old)] and old.read_text().endswith("old qemu-img\n")
    assert str(dest / "usr/local/bin/qemu-system-x86_64") in doc["removed"]
    assert not (dest / "usr/local/bin/qemu-system-x86_64").exists()
    assert doc["skipped"] == [] and doc["manifest"].endswith(".json")

    nope = _doc(_run(env, "clean", "--recipe", "nope", "--json"), ok=False)
    assert "nope" in nope["error"]
    doc = _doc(_run(env, "clean", "--json"), ok=True)
    assert str(out) in doc["removed"] and not out.exists()
    assert (doc["recipe"], doc["builder"]) == ("fake-qemu", "native")
    assert _doc(_run(env, "clean", "--json"), ok=True)["removed"] == []


def test_repro_check_json(tmp_path):
    if shutil.which("cc") is None or shutil.which("make") is None:
        pytest.skip("no host compiler (cc/make) for the native builds")
    env = _env(tmp_path, KVMLAB_BUILDER="native", **fake_home(tmp_path / "same"))
    doc = _doc(_run(env, "repro-check", "--json"), ok=True)
    assert doc["matches"] and doc["differ"] == [] and doc["artifacts"]
    assert all(a["same"] and len(a["first"]) == 64 for a in doc["artifacts"])
    assert "bin/qemu-img" in {a["path"] for a in doc["artifacts"]}
    # a build that embeds the time: qemu-img differs between the two builds
    varying = fake_home(tmp_path / "varying", make=["sh", "-c",
                                                    "make -j2 && date +%s%N >> qemu-img"])
    env = _env(tmp_path, KVMLAB_BUILDER="native", **varying)
    doc = _doc(_run(env, "repro-check", "--json"), ok=False)
    assert doc["matches"] is False and doc["differ"] == ["bin/qemu-img"]
    assert "differ between two builds" in doc["error"]
    (row,) = [a for a in doc["artifacts"] if a["path"] == "bin/qemu-img"]
    assert not row["same"] and row["first"] != row["second"]


def _empty_image(client, ref: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ti = tarfile.TarInfo("marker")
        data = b"kvmlab test base\n"
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    repo, tag = ref.rsplit(":", 1)
    client.api.import_image_from_data(buf.getvalue(), repository=repo, tag=tag)


@pytest.mark.docker
def test_images_json(tmp_path):
    reason = docker_available()
    if reason:
        pytest.skip(f"no docker daemon: {reason}")
    from kvmlab.build.images import docker_client
    client = docker_client()
    base = f"kvmlab-test/jsonbase:{os.getpid()}"
    name = f"jsontest{os.getpid()}"
    _empty_image(client, base)
    home = tmp_path / "home"
    (home / "docker" / name).mkdir(parents=True)
    (home / "docker" / name / "Dockerfile").write_text(
        f"ARG BASE={base}\nFROM ${{BASE}}\nLABEL kvmlab.test=json\n")
    env = _env(tmp_path, KVMLAB_HOME=str(home))
    try:
        doc = _doc(_run(env, "images", "--builder", name, "--json"), ok=True)
        (img,) = doc["images"]
        assert img["builder"] == name and img["status"] == "built"
        assert img["image"] == f"kvmlab/{name}:{img['tag']}" and img["id"].startswith("sha256:")
        assert client.images.get(img["image"]).id == img["id"]
        again = _doc(_run(env, "images", "--builder", name, "--json"), ok=True)
        assert again["images"][0]["status"] == "no-op" and again["images"][0]["id"] == img["id"]
        bad = _doc(_run(env, "images", "--builder", "nope", "--json"), ok=False)
        assert "unknown image builder 'nope'" in bad["error"] and name in bad["hint"]
    finally:
        for ref in [t for i in client.images.list(name=f"kvmlab/{name}") for t in i.tags]:
            client.images.remove(ref, force=True)
        client.images.remove(base, force=True)
        client.close()


# --------------------------------------------------------------------------------------------
# -f FILE under --json
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("program", ["invoke", "kvmlab"])
@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_bad_config_file_is_a_json_error(tmp_path, program, case):
    env = _env(tmp_path)
    cfg = tmp_path / "bad.yaml"
    if case == "malformed":
        cfg.write_text("kvmlab: [unclosed\n")
    cwd = REPO if program == "invoke" else tmp_path       # invoke finds tasks.py there
    text = _run(env, "-f", str(cfg), "status", program=program, cwd=cwd)
    r = _run(env, "-f", str(cfg), "status", "--json", program=program, cwd=cwd)
    doc = _doc(r, ok=False)
    assert r.returncode == text.returncode == 1
    assert str(cfg) in doc["error"] and doc["hint"]
    assert ("no such file" in doc["error"]) == (case == "missing")
    assert text.stdout == "" and text.stderr.splitlines()[-2] == "error: " + doc["error"]


def test_invoke_refusals_are_json_too(tmp_path):
    env = _env(tmp_path)
    doc = _doc(_run(env, "status", "--no-such-flag", "--json"), ok=False)
    assert "--no-such-flag" in doc["error"] and doc["hint"]
    doc = _doc(_run(env, "no-such-task", "--json", program="kvmlab", cwd=tmp_path), ok=False)
    assert "no-such-task" in doc["error"]


# --------------------------------------------------------------------------------------------
# status shows a standalone doctor and boot-test
# --------------------------------------------------------------------------------------------

def test_standalone_doctor_verdict_in_status(tmp_path):
    env = _env(tmp_path)
    before = _run(env, "status", "--json")
    assert _doc(before, ok=True)["doctor"] is None
    r = _run(env, "doctor", "--json", "--timeout", "20", timeout=180)
    d = json.loads(r.stdout)
    # strict: exit 1 exactly when KVM cannot run guests here; recorded either way
    assert (r.returncode == 0) == d["usable"], r.stderr[-2000:]
    record = tmp_path / "state" / "host" / "last-doctor.json"
    assert d["record"] == str(record) and record.is_file()
    st = _doc(_run(env, "status", "--json"), ok=True)["doctor"]
    assert (st["verdict"], st["usable"], st["source"]) == (d["verdict"], d["usable"], "doctor")
    assert st["path"] == str(record) and st["facts"]["cpu"] == d["facts"]["cpu"]
    assert abs(time.time() - time.mktime(time.strptime(st["time"], "%Y-%m-%dT%H:%M:%SZ"))
               + time.timezone) < 600
    line = next(ln for ln in _run(env, "status").stdout.splitlines()
                if ln.startswith("last doctor verdict:"))
    assert d["verdict"] in line and "invoke doctor" in line and str(record) in line

    # a lab doctor stamp written later wins; the older standalone record is not shown
    from kvmlab.core.stamps import Stamp
    stamp = tmp_path / "state" / "lab" / "doctor.stamp.json"
    Stamp(stamp, "lab doctor").write({}, {"step": "doctor", "record": {"facts": {
        "verdict": "a later lab verdict", "usable": False}}})
    later = time.time() + 120
    os.utime(stamp, (later, later))
    st = _doc(_run(env, "status", "--json"), ok=True)["doctor"]
    assert (st["verdict"], st["source"], st["path"]) == ("a later lab verdict", "lab", str(stamp))


def test_standalone_boot_test_in_status(tmp_path, distro_qemu):
    env = _env(tmp_path)
    assert _run(env, "guest", "--kind", "tiny").returncode == 0
    boot = _doc(_run(env, "boot-test", "--qemu", str(distro_qemu), "--accel", "tcg",
                     "--guest", "tiny", "--json"), ok=True)
    (res,) = boot["results"]
    assert boot["verify"]["check"] == "boot" and boot["verify"]["failed"] == 0
    st = _doc(_run(env, "status", "--json"), ok=True)["last_boot"]
    (run,) = st["runs"]
    assert (run["guest"], run["accel"], run["booted"]) == ("tiny", "tcg", True)
    assert run["seconds"] == res["seconds"] and run["qemu"] == str(distro_qemu) and st["time"]
    line = next(ln for ln in _run(env, "status").stdout.splitlines()
                if ln.startswith("last boot-test:"))
    assert f"tiny booted in {res['seconds']:.2f} s under tcg" in line


# --------------------------------------------------------------------------------------------
# skipped checks are not passed checks
# --------------------------------------------------------------------------------------------

def test_step_checks_count_skipped_apart(tmp_path):
    env = _env(tmp_path, **fake_home(tmp_path / "home"))
    tree = write_fake_qemu_tree(tmp_path / "checkout")
    # a --source directory is used as is: the cached-file checks skip, the others pass
    r = _run(env, "fetch", "--source", str(tree), "--json")
    v = _doc(r, ok=True)["verify"]
    assert v["check"] == "fetch" and v["skipped"] >= 1 and v["passed"] >= 1
    assert v["failed"] == 0
    assert any("used as is" in why for why in v["skipped_reasons"])
    assert v["summary"] == (f"{v['passed']} passed, {v['skipped']} skipped ("
                            + "; ".join(v["skipped_reasons"][:3]) + ")")
    text = _run(env, "fetch", "--source", str(tree))
    assert text.returncode == 0, text.stderr
    assert f"verified fetch: {v['summary']}" in text.stdout
    rep = _doc(_run(env, "verify", "--step", "fetch", "--json"), ok=True)
    assert (rep["passed"], rep["skipped"]) == (v["passed"], v["skipped"])
    assert sum(1 for x in rep["results"] if x["status"] == "skipped") == rep["skipped"]
