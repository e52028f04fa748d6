"""Lab pieces that need no daemon: inventory parsing, the remote command, lock comparison."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvmlab.core.errors import LabError
from kvmlab.lab import remote
from kvmlab.lab.inventory import load_hosts
from kvmlab.lab import runner as lab


def test_inventory_lines_and_toml(tmp_path):
    p = tmp_path / "hosts.txt"
    p.write_text("# lab\nssh://root@127.0.0.1:2201 key=/k\nadmin@labhost\n\n127.0.0.2:2202  # c\n")
    hosts = load_hosts(str(p))
    assert [(h.user, h.address, h.port, h.key) for h in hosts] == [
        ("root", "127.0.0.1", 2201, "/k"), ("admin", "labhost", 22, None),
        ("root", "127.0.0.2", 2202, None)]
    t = tmp_path / "hosts.toml"
    t.write_text('hosts = ["ssh://a@h1:2"]\n[[host]]\naddress = "h2"\nuser = "b"\nport = 3\n')
    assert [h.label for h in load_hosts(str(t))] == ["a@h1:2", "b@h2:3"]


@pytest.mark.parametrize("text,needle", [
    ("", "names no hosts"),
    ("ssh://root@h:22 colour=blue\n", "unknown field"),
    ("http://h/\n", "not an ssh target"),
])
def test_inventory_errors(tmp_path, text, needle):
    p = tmp_path / "hosts.txt"
    p.write_text(text)
    with pytest.raises(LabError) as e:
        load_hosts(str(p))
    assert needle in e.value.message


def test_remote_command_quotes_and_skips_build_steps():
    opts = lab.LabOptions(recipe="r; rm -rf /", builder="debian12", prefix="/opt/x y",
                          skip=("boot-test",))
    cmd = remote.remote_command(opts)
    assert "'r; rm -rf /'" in cmd and "'/opt/x y'" in cmd
    assert "--skip fetch,patch,images,build,boot-test" in cmd
    assert "--install-deps" not in cmd
    deps = remote.remote_command(lab.LabOptions(recipe="r", builder="debian12", install_deps=True))
    assert deps.endswith(" --install-deps")


def test_check_reports_changed_installed_file(kvmlab_env, tmp_path):
    f = tmp_path / "bios.bin"
    f.write_bytes(b"good")
    from kvmlab.core.fsutil import sha256_file
    lock = {"recipe": {"name": "qemu-kvm-0.12.1.2"}, "builder": "debian12",
            "installed": {str(f): sha256_file(f)}}
    now = lab.current_facts(kvmlab_env, lock, host_facts=False)
    assert now["installed"][str(f)] == sha256_file(f)
    f.write_bytes(b"bad")
    lp = lab.lock_path(kvmlab_env)
    lp.write_text(json.dumps({**lock, **{k: v for k, v in now.items() if k != "installed"}}))
    diffs = lab.check(kvmlab_env, host_facts=False)
    assert [d.key for d in diffs] == [f"installed.{f}"]
    f.unlink()
    assert lab.check(kvmlab_env, host_facts=False)[0].now == "missing"


def test_resume_without_state_is_a_clear_error(kvmlab_env):
    with pytest.raises(LabError) as e:
        lab.run_lab(kvmlab_env, lab.LabOptions(recipe="qemu-kvm-0.12.1.2", builder="debian12"),
                    resume=True)
    assert "nothing to resume" in e.value.message


def test_unknown_skip_step(kvmlab_env):
    with pytest.raises(LabError):
        lab.run_lab(kvmlab_env, lab.LabOptions(recipe="qemu-kvm-0.12.1.2", builder="debian12",
                                               skip=("bogus",)))


DATA = Path(__file__).resolve().parent.parent / "data"


def test_lock_written_before_the_step_registry_is_still_checked(kvmlab_env):
    """tests/data/lab.lock.v1.json was written by lab.make_lock before kvmlab.lab.steps existed
    (the installed map filled in by hand: its manifests never existed). `lab --check` still reads
    it and names every difference; nothing here is installed, so every installed file is missing."""
    old = json.loads((DATA / "lab.lock.v1.json").read_text())
    shutil.copy(DATA / "lab.lock.v1.json", lab.lock_path(kvmlab_env))
    diffs = {d.key: d for d in lab.check(kvmlab_env, host_facts=False)}
    installed = sorted(k for k in diffs if k.startswith("installed."))
    assert installed == sorted(f"installed.{p}" for p in old["installed"])
    assert {diffs[k].now for k in installed} == {"missing"}
    art = diffs["build.artifacts.bin/qemu-system-x86_64"]
    assert (art.locked, art.now) == ("d" * 64, "(absent)")
    assert "recipe.name" not in diffs  # the recipe it names is read and matches


def test_one_step_registry_names_checks_and_controller_steps(kvmlab_env):
    from kvmlab.lab import steps, verify
    assert steps.NAMES == ("fetch", "patch", "images", "build", "install", "install-bios",
                           "load-modules", "doctor", "create-image", "guest", "boot-test",
                           "nested")   # lab --nested (skipped without it)
    assert steps.check_of("doctor") == steps.check_of("load-modules") == "host"
    assert steps.check_of("boot-test") == "boot" and steps.check_of("kmod") == "kmod"
    assert lab.VERIFIED_STEPS == ("fetch", "patch", "build", "install", "host", "boot")
    assert set(lab.VERIFIED_STEPS) <= set(verify.available_steps(kvmlab_env))
    assert remote.HOST_STEPS_SKIP == ("fetch", "patch", "images", "build")
    assert [s.name for s in steps.STEPS if s.stamped] == ["doctor", "boot-test"]
